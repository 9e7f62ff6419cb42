//! Which listed egress an attempt of unknown outcome provably started.
//!
//! livekit-server makes the egress ID on each call and takes no idempotency key, so an attempt
//! whose answer was lost is recognised by what it asked for: the same request (the request
//! livekit-server lists is redacted, so both sides are compared redacted: the same kind, room,
//! layout, outputs, everything but the secrets), started no earlier than the attempt began
//! (give or take the clocks' skew; an egress without a start time proves nothing). An egress
//! recorded for any ticket is never taken (the caller checks that against the queues): other
//! tools, the backend itself or another queue may start the same request in the same room.
//! Among several candidates, the earliest comes first.

use std::time::Duration;

use livekit_protocol as proto;

use crate::egress_redact::redact;
use crate::egress_request::StartRequest;

/// When the egress started (or was last updated, while it is still starting), ms.
fn egress_time_ms(info: &proto::EgressInfo) -> Option<u64> {
    let nanos = if info.started_at > 0 {
        info.started_at
    } else {
        info.updated_at
    };
    u64::try_from(nanos / 1_000_000).ok().filter(|ms| *ms > 0)
}

/// Whether `info` may be the egress an attempt on `request` begun at `since_ms` started.
pub fn may_be_attempt(
    info: &proto::EgressInfo,
    request: &StartRequest,
    since_ms: u64,
    skew: Duration,
) -> bool {
    let Some(listed) = info
        .request
        .as_ref()
        .and_then(StartRequest::from_info_request)
    else {
        return false;
    };
    if redact(&listed) != redact(request) {
        return false;
    }
    egress_time_ms(info).is_some_and(|at| at + skew.as_millis() as u64 >= since_ms)
}

/// The candidates among `listed`, earliest first.
pub fn candidates<'a>(
    listed: &'a [proto::EgressInfo],
    request: &StartRequest,
    since_ms: u64,
    skew: Duration,
) -> Vec<&'a proto::EgressInfo> {
    let mut found: Vec<&proto::EgressInfo> = listed
        .iter()
        .filter(|info| may_be_attempt(info, request, since_ms, skew))
        .collect();
    found.sort_by_key(|info| egress_time_ms(info).unwrap_or(u64::MAX));
    found
}

/// What the status of a found egress means for its ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundStatus {
    /// Starting, active or ending: the ticket is active.
    Running,
    /// Complete or at its limit: the recording happened and is over.
    Over,
    /// Failed, or aborted (stopped before it recorded).
    Failed,
}

/// Classifies an egress status.
pub fn found_status(info: &proto::EgressInfo) -> FoundStatus {
    use proto::EgressStatus;
    match EgressStatus::try_from(info.status) {
        Ok(
            EgressStatus::EgressStarting | EgressStatus::EgressActive | EgressStatus::EgressEnding,
        ) => FoundStatus::Running,
        Ok(EgressStatus::EgressFailed | EgressStatus::EgressAborted) => FoundStatus::Failed,
        Ok(_) => FoundStatus::Over,
        // A status this code does not know: assume it runs rather than start a second one.
        Err(_) => FoundStatus::Running,
    }
}

/// LiveKit's error of a failed or aborted egress, as a dead letter keeps it.
pub fn egress_error(info: &proto::EgressInfo) -> String {
    let status = proto::EgressStatus::try_from(info.status)
        .map(|status| status.as_str_name())
        .unwrap_or("EGRESS_UNKNOWN");
    if info.error.is_empty() {
        format!("egress {} ended {status}", info.egress_id)
    } else {
        format!("egress {} ended {status}: {}", info.egress_id, info.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EgressKind;
    use serde_json::json;

    const SKEW: Duration = Duration::from_secs(2);

    fn info(request: &StartRequest, started_ms: i64) -> proto::EgressInfo {
        proto::EgressInfo {
            egress_id: format!("EG_{started_ms}"),
            room_name: request.room_name().unwrap_or_default().to_owned(),
            started_at: started_ms * 1_000_000,
            status: proto::EgressStatus::EgressActive as i32,
            request: Some(request.to_info_request()),
            ..proto::EgressInfo::default()
        }
    }

    #[test]
    fn kind_room_and_time_must_agree() {
        let ours = StartRequest::parse(EgressKind::RoomComposite, "a", None).unwrap();
        assert!(may_be_attempt(&info(&ours, 10_000), &ours, 10_000, SKEW));
        assert!(
            may_be_attempt(&info(&ours, 8_500), &ours, 10_000, SKEW),
            "within skew"
        );
        assert!(
            !may_be_attempt(&info(&ours, 7_000), &ours, 10_000, SKEW),
            "older"
        );
        let audio = StartRequest::parse(EgressKind::AudioRoomComposite, "a", None).unwrap();
        assert!(!may_be_attempt(&info(&audio, 10_000), &ours, 10_000, SKEW));
        let other_room = StartRequest::parse(EgressKind::RoomComposite, "b", None).unwrap();
        assert!(!may_be_attempt(
            &info(&other_room, 10_000),
            &ours,
            10_000,
            SKEW
        ));
        let web = |url: &str| {
            StartRequest::parse(EgressKind::Web, "a", Some(json!({ "url": url }))).unwrap()
        };
        assert!(may_be_attempt(
            &info(&web("https://x"), 10_000),
            &web("https://x"),
            10_000,
            SKEW
        ));
        assert!(!may_be_attempt(
            &info(&web("https://y"), 10_000),
            &web("https://x"),
            10_000,
            SKEW
        ));
    }

    #[test]
    fn only_the_same_request_is_a_candidate_earliest_first() {
        let ours = StartRequest::parse(
            EgressKind::RoomComposite,
            "a",
            Some(json!({"layout": "speaker"})),
        )
        .unwrap();
        let other_layout = StartRequest::parse(
            EgressKind::RoomComposite,
            "a",
            Some(json!({"layout": "grid"})),
        )
        .unwrap();
        let listed = vec![
            info(&other_layout, 11_000),
            info(&ours, 13_000),
            info(&ours, 12_000),
        ];
        let found = candidates(&listed, &ours, 10_000, SKEW);
        let ids: Vec<&str> = found.iter().map(|i| i.egress_id.as_str()).collect();
        assert_eq!(ids, ["EG_12000", "EG_13000"]);
    }

    #[test]
    fn a_listed_request_matches_with_its_secrets_redacted_and_needs_a_time() {
        let ours = StartRequest::parse(
            EgressKind::RoomComposite,
            "a",
            Some(json!({"fileOutputs": [{"filepath": "a.mp4", "s3": {
                "accessKey": "AKIA-secret", "secret": "very-secret", "bucket": "rec"
            }}]})),
        )
        .unwrap();
        let mut listed = info(&redact(&ours), 10_000);
        assert!(may_be_attempt(&listed, &ours, 10_000, SKEW));
        let elsewhere = StartRequest::parse(
            EgressKind::RoomComposite,
            "a",
            Some(json!({"fileOutputs": [{"filepath": "a.mp4", "s3": {
                "accessKey": "AKIA-secret", "secret": "very-secret", "bucket": "other"
            }}]})),
        )
        .unwrap();
        assert!(!may_be_attempt(
            &info(&redact(&elsewhere), 10_000),
            &ours,
            10_000,
            SKEW
        ));
        listed.started_at = 0;
        listed.updated_at = 0;
        assert!(
            !may_be_attempt(&listed, &ours, 10_000, SKEW),
            "no time proves nothing"
        );
    }

    #[test]
    fn statuses_are_classified() {
        let mut egress = proto::EgressInfo::default();
        for (status, expected) in [
            (proto::EgressStatus::EgressStarting, FoundStatus::Running),
            (proto::EgressStatus::EgressEnding, FoundStatus::Running),
            (proto::EgressStatus::EgressComplete, FoundStatus::Over),
            (proto::EgressStatus::EgressLimitReached, FoundStatus::Over),
            (proto::EgressStatus::EgressFailed, FoundStatus::Failed),
            (proto::EgressStatus::EgressAborted, FoundStatus::Failed),
        ] {
            egress.status = status as i32;
            assert_eq!(found_status(&egress), expected);
        }
    }
}
