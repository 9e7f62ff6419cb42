//! The LiveKit start request stored with a ticket: validated at intake against the kind's
//! protobuf message, so that the dispatcher later calls the right Twirp method with it.

use livekit_protocol as proto;
use serde_json::Value;

use crate::model::EgressKind;

/// A start request for one of the egress kinds.
#[derive(Debug, Clone, PartialEq)]
pub enum StartRequest {
    /// `StartRoomCompositeEgress` (video or audio-only).
    RoomComposite(proto::RoomCompositeEgressRequest),
    /// `StartWebEgress` (video or audio-only).
    Web(proto::WebEgressRequest),
    /// `StartParticipantEgress`.
    Participant(proto::ParticipantEgressRequest),
    /// `StartTrackCompositeEgress`.
    TrackComposite(proto::TrackCompositeEgressRequest),
    /// `StartTrackEgress`.
    Track(proto::TrackEgressRequest),
}

/// The request does not fit its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

fn field_error(kind: EgressKind, what: &str) -> InvalidRequest {
    InvalidRequest(format!("a {kind} request needs {what}"))
}

impl StartRequest {
    /// Validates `request` (protobuf JSON, may be absent) for `kind` and `room_name`; fills the
    /// room name in and makes `audio_only` agree with the kind.
    pub fn parse(
        kind: EgressKind,
        room_name: &str,
        request: Option<Value>,
    ) -> Result<Self, InvalidRequest> {
        let request = request.unwrap_or_else(|| Value::Object(Default::default()));
        if !request.is_object() {
            return Err(InvalidRequest("request must be a JSON object".to_owned()));
        }
        fn decode<T: serde::de::DeserializeOwned>(
            kind: EgressKind,
            value: Value,
        ) -> Result<T, InvalidRequest> {
            serde_json::from_value(value).map_err(|error| {
                InvalidRequest(format!("request is not a valid {kind} request: {error}"))
            })
        }
        let check_room = |given: &mut String| -> Result<(), InvalidRequest> {
            if given.is_empty() {
                *given = room_name.to_owned();
                Ok(())
            } else if given == room_name {
                Ok(())
            } else {
                Err(InvalidRequest(format!(
                    "request room_name {given:?} differs from room_name {room_name:?}"
                )))
            }
        };
        let audio = matches!(kind, EgressKind::AudioRoomComposite | EgressKind::AudioWeb);
        let check_audio = |audio_only: &mut bool| -> Result<(), InvalidRequest> {
            if *audio_only && !audio {
                return Err(InvalidRequest(format!(
                    "request is audio_only but the kind is {kind}: use audio_{kind} so it is costed as audio"
                )));
            }
            *audio_only = audio;
            Ok(())
        };
        Ok(match kind {
            EgressKind::RoomComposite | EgressKind::AudioRoomComposite => {
                let mut parsed: proto::RoomCompositeEgressRequest = decode(kind, request)?;
                check_room(&mut parsed.room_name)?;
                check_audio(&mut parsed.audio_only)?;
                StartRequest::RoomComposite(parsed)
            }
            EgressKind::Web | EgressKind::AudioWeb => {
                let mut parsed: proto::WebEgressRequest = decode(kind, request)?;
                if parsed.url.is_empty() {
                    return Err(field_error(kind, "request.url"));
                }
                check_audio(&mut parsed.audio_only)?;
                StartRequest::Web(parsed)
            }
            EgressKind::Participant => {
                let mut parsed: proto::ParticipantEgressRequest = decode(kind, request)?;
                check_room(&mut parsed.room_name)?;
                if parsed.identity.is_empty() {
                    return Err(field_error(kind, "request.identity"));
                }
                StartRequest::Participant(parsed)
            }
            EgressKind::TrackComposite => {
                let mut parsed: proto::TrackCompositeEgressRequest = decode(kind, request)?;
                check_room(&mut parsed.room_name)?;
                if parsed.audio_track_id.is_empty() && parsed.video_track_id.is_empty() {
                    return Err(field_error(
                        kind,
                        "request.audio_track_id or request.video_track_id",
                    ));
                }
                StartRequest::TrackComposite(parsed)
            }
            EgressKind::Track => {
                let mut parsed: proto::TrackEgressRequest = decode(kind, request)?;
                check_room(&mut parsed.room_name)?;
                if parsed.track_id.is_empty() {
                    return Err(field_error(kind, "request.track_id"));
                }
                StartRequest::Track(parsed)
            }
        })
    }

    /// The egress kind the request starts (audio-only composites are their own kinds).
    pub fn kind(&self) -> EgressKind {
        match self {
            StartRequest::RoomComposite(request) if request.audio_only => {
                EgressKind::AudioRoomComposite
            }
            StartRequest::RoomComposite(_) => EgressKind::RoomComposite,
            StartRequest::Web(request) if request.audio_only => EgressKind::AudioWeb,
            StartRequest::Web(_) => EgressKind::Web,
            StartRequest::Participant(_) => EgressKind::Participant,
            StartRequest::TrackComposite(_) => EgressKind::TrackComposite,
            StartRequest::Track(_) => EgressKind::Track,
        }
    }

    /// The room it records; `None` for web egress, which records a URL.
    pub fn room_name(&self) -> Option<&str> {
        match self {
            StartRequest::RoomComposite(request) => Some(&request.room_name),
            StartRequest::Web(_) => None,
            StartRequest::Participant(request) => Some(&request.room_name),
            StartRequest::TrackComposite(request) => Some(&request.room_name),
            StartRequest::Track(request) => Some(&request.room_name),
        }
    }

    /// The Twirp method of `livekit.Egress` that starts it.
    pub fn method(&self) -> &'static str {
        match self {
            StartRequest::RoomComposite(_) => "StartRoomCompositeEgress",
            StartRequest::Web(_) => "StartWebEgress",
            StartRequest::Participant(_) => "StartParticipantEgress",
            StartRequest::TrackComposite(_) => "StartTrackCompositeEgress",
            StartRequest::Track(_) => "StartTrackEgress",
        }
    }

    /// The request in protobuf binary encoding, as sent to livekit-server.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        use prost::Message;
        match self {
            StartRequest::RoomComposite(request) => request.encode_to_vec(),
            StartRequest::Web(request) => request.encode_to_vec(),
            StartRequest::Participant(request) => request.encode_to_vec(),
            StartRequest::TrackComposite(request) => request.encode_to_vec(),
            StartRequest::Track(request) => request.encode_to_vec(),
        }
    }

    /// The request as `EgressInfo` carries it.
    pub fn to_info_request(&self) -> proto::egress_info::Request {
        use proto::egress_info::Request;
        match self.clone() {
            StartRequest::RoomComposite(request) => Request::RoomComposite(request),
            StartRequest::Web(request) => Request::Web(request),
            StartRequest::Participant(request) => Request::Participant(request),
            StartRequest::TrackComposite(request) => Request::TrackComposite(request),
            StartRequest::Track(request) => Request::Track(request),
        }
    }

    /// The start request an `EgressInfo` carries, when it is one of the five kinds here.
    pub fn from_info_request(request: &proto::egress_info::Request) -> Option<Self> {
        use proto::egress_info::Request;
        Some(match request.clone() {
            Request::RoomComposite(request) => StartRequest::RoomComposite(request),
            Request::Web(request) => StartRequest::Web(request),
            Request::Participant(request) => StartRequest::Participant(request),
            Request::TrackComposite(request) => StartRequest::TrackComposite(request),
            Request::Track(request) => StartRequest::Track(request),
            Request::Egress(_) | Request::Replay(_) => return None,
        })
    }

    /// The request as protobuf JSON, the form stored with the ticket.
    pub fn to_json(&self) -> String {
        let encoded = match self {
            StartRequest::RoomComposite(request) => serde_json::to_string(request),
            StartRequest::Web(request) => serde_json::to_string(request),
            StartRequest::Participant(request) => serde_json::to_string(request),
            StartRequest::TrackComposite(request) => serde_json::to_string(request),
            StartRequest::Track(request) => serde_json::to_string(request),
        };
        encoded.expect("protobuf messages always encode as JSON")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn room_composite_without_request_gets_the_room() {
        let parsed = StartRequest::parse(EgressKind::RoomComposite, "standup", None).unwrap();
        let StartRequest::RoomComposite(request) = &parsed else {
            panic!("wrong kind")
        };
        assert_eq!(request.room_name, "standup");
        assert!(!request.audio_only);
        let again: Value = serde_json::from_str(&parsed.to_json()).unwrap();
        assert_eq!(again["roomName"], "standup");
    }

    #[test]
    fn audio_kind_sets_audio_only_and_video_kind_refuses_it() {
        let StartRequest::RoomComposite(request) =
            StartRequest::parse(EgressKind::AudioRoomComposite, "r", None).unwrap()
        else {
            panic!("wrong kind")
        };
        assert!(request.audio_only);
        let error = StartRequest::parse(
            EgressKind::RoomComposite,
            "r",
            Some(json!({"audioOnly": true})),
        )
        .unwrap_err();
        assert!(error.0.contains("audio_room_composite"), "{error}");
    }

    #[test]
    fn mismatched_room_and_unknown_fields_are_refused() {
        assert!(
            StartRequest::parse(
                EgressKind::RoomComposite,
                "a",
                Some(json!({"room_name": "b"}))
            )
            .is_err()
        );
        assert!(
            StartRequest::parse(
                EgressKind::RoomComposite,
                "a",
                Some(json!({"room_name": "a"}))
            )
            .is_ok()
        );
        // Like LiveKit's own Twirp JSON decoding, unknown fields are dropped.
        let lenient =
            StartRequest::parse(EgressKind::RoomComposite, "a", Some(json!({"bogus": 1}))).unwrap();
        assert!(!lenient.to_json().contains("bogus"));
        assert!(
            StartRequest::parse(EgressKind::RoomComposite, "a", Some(json!({"layout": 7})))
                .is_err()
        );
        assert!(StartRequest::parse(EgressKind::RoomComposite, "a", Some(json!([1]))).is_err());
    }

    #[test]
    fn kinds_that_need_ids_say_which() {
        let error = StartRequest::parse(EgressKind::Track, "a", None).unwrap_err();
        assert!(error.0.contains("track_id"));
        assert!(
            StartRequest::parse(EgressKind::Track, "a", Some(json!({"trackId": "TR_1"}))).is_ok()
        );
        assert!(
            StartRequest::parse(EgressKind::Web, "a", None)
                .unwrap_err()
                .0
                .contains("url")
        );
        assert!(
            StartRequest::parse(
                EgressKind::Participant,
                "a",
                Some(json!({"identity": "bob"}))
            )
            .is_ok()
        );
        assert!(StartRequest::parse(EgressKind::TrackComposite, "a", None).is_err());
    }

    #[test]
    fn kinds_methods_and_info_requests_round_trip() {
        let parsed = StartRequest::parse(EgressKind::AudioRoomComposite, "r", None).unwrap();
        assert_eq!(parsed.kind(), EgressKind::AudioRoomComposite);
        assert_eq!(parsed.method(), "StartRoomCompositeEgress");
        assert_eq!(parsed.room_name(), Some("r"));
        let info = parsed.to_info_request();
        assert_eq!(StartRequest::from_info_request(&info), Some(parsed.clone()));
        let web = StartRequest::parse(
            EgressKind::Web,
            "r",
            Some(json!({"url": "https://example.com"})),
        )
        .unwrap();
        assert_eq!((web.kind(), web.room_name()), (EgressKind::Web, None));
        use prost::Message;
        let decoded =
            proto::RoomCompositeEgressRequest::decode(parsed.encode_to_vec().as_slice()).unwrap();
        assert!(decoded.audio_only);
    }
}
