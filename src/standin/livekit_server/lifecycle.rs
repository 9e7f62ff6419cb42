//! An egress's statuses (FIDELITY.md 2): STARTING when stored, ACTIVE after `active_after`,
//! ENDING on a stop or the end of the recording, COMPLETE after `ending_for`; FAILED or
//! ABORTED otherwise. Each change sends its webhook (`egress_started`, `egress_updated` on
//! ACTIVE and ENDING, `egress_ended` on the final status); the pod's job ends with the final
//! status. An orphaned egress never changes again.

use std::sync::{Arc, Weak};
use std::time::Duration;

use livekit_protocol as proto;
use proto::EgressStatus as Status;

use super::twirp::Failure;
use super::{Inner, unix_nanos};
use crate::egress_redact::redact;
use crate::egress_request::StartRequest;

/// STARTING or ACTIVE: an egress a stop or an end still acts on.
pub(super) fn is_running(info: &proto::EgressInfo) -> bool {
    info.status == Status::EgressStarting as i32 || info.status == Status::EgressActive as i32
}

/// STARTING, ACTIVE or ENDING: what `ListEgress` with `active` keeps.
pub(super) fn is_listed_active(info: &proto::EgressInfo) -> bool {
    is_running(info) || info.status == Status::EgressEnding as i32
}

/// `source_type` as the pod sets it: SDK for participant, track and track composite egress
/// and for an audio-only room composite without layout or custom URL; WEB otherwise.
fn source_type(request: &StartRequest) -> proto::EgressSourceType {
    match request {
        StartRequest::RoomComposite(request)
            if request.audio_only
                && request.layout.is_empty()
                && request.custom_base_url.is_empty() =>
        {
            proto::EgressSourceType::Sdk
        }
        StartRequest::RoomComposite(_) | StartRequest::Web(_) => proto::EgressSourceType::Web,
        StartRequest::Participant(_) | StartRequest::TrackComposite(_) | StartRequest::Track(_) => {
            proto::EgressSourceType::Sdk
        }
    }
}

/// The results the pod fills in before it answers, one per output of the (redacted) request:
/// file names and playlist names as given (the pod would also expand their `{room_name}`-style
/// templates), stream URLs with their keys hidden.
fn results(info: &mut proto::EgressInfo, request: &StartRequest) {
    let (files, streams, segments, images): (
        Vec<&str>,
        Vec<&proto::StreamOutput>,
        Vec<&proto::SegmentedFileOutput>,
        Vec<&proto::ImageOutput>,
    ) = match request {
        StartRequest::RoomComposite(r) => (
            r.file_outputs.iter().map(|f| f.filepath.as_str()).collect(),
            r.stream_outputs.iter().collect(),
            r.segment_outputs.iter().collect(),
            r.image_outputs.iter().collect(),
        ),
        StartRequest::Web(r) => (
            r.file_outputs.iter().map(|f| f.filepath.as_str()).collect(),
            r.stream_outputs.iter().collect(),
            r.segment_outputs.iter().collect(),
            r.image_outputs.iter().collect(),
        ),
        StartRequest::Participant(r) => (
            r.file_outputs.iter().map(|f| f.filepath.as_str()).collect(),
            r.stream_outputs.iter().collect(),
            r.segment_outputs.iter().collect(),
            r.image_outputs.iter().collect(),
        ),
        StartRequest::TrackComposite(r) => (
            r.file_outputs.iter().map(|f| f.filepath.as_str()).collect(),
            r.stream_outputs.iter().collect(),
            r.segment_outputs.iter().collect(),
            r.image_outputs.iter().collect(),
        ),
        StartRequest::Track(r) => match &r.output {
            Some(proto::track_egress_request::Output::File(file)) => (
                vec![file.filepath.as_str()],
                Vec::new(),
                Vec::new(),
                Vec::new(),
            ),
            _ => (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
        },
    };
    info.file_results = files
        .into_iter()
        .map(|filename| proto::FileInfo {
            filename: filename.to_owned(),
            ..proto::FileInfo::default()
        })
        .collect();
    info.stream_results = streams
        .into_iter()
        .flat_map(|stream| stream.urls.iter())
        .map(|url| proto::StreamInfo {
            url: url.clone(),
            ..proto::StreamInfo::default()
        })
        .collect();
    info.segment_results = segments
        .into_iter()
        .map(|segments| proto::SegmentsInfo {
            playlist_name: segments.playlist_name.clone(),
            live_playlist_name: segments.live_playlist_name.clone(),
            ..proto::SegmentsInfo::default()
        })
        .collect();
    info.image_results = images
        .into_iter()
        .map(|images| proto::ImagesInfo {
            filename_prefix: images.filename_prefix.clone(),
            ..proto::ImagesInfo::default()
        })
        .collect();
}

/// The pod's `EgressInfo` of a start: STARTING, now, the redacted request and its results.
pub(super) fn starting_info(
    request: &StartRequest,
    egress_id: &str,
    room: Option<&proto::Room>,
) -> proto::EgressInfo {
    let now = unix_nanos();
    let (room_id, room_name) = match request.room_name() {
        Some(name) => (
            room.map(|room| room.sid.clone()).unwrap_or_default(),
            name.to_owned(),
        ),
        None => (String::new(), String::new()),
    };
    let redacted = redact(request);
    let mut info = proto::EgressInfo {
        egress_id: egress_id.to_owned(),
        room_id,
        room_name,
        source_type: source_type(request) as i32,
        status: Status::EgressStarting as i32,
        started_at: now,
        updated_at: now,
        request: Some(redacted.to_info_request()),
        ..proto::EgressInfo::default()
    };
    results(&mut info, &redacted);
    info
}

impl Inner {
    /// Sends an egress webhook on the egress's own queue, with its room.
    pub(super) fn egress_webhook(&self, event: &str, info: &proto::EgressInfo) {
        let room = (!info.room_name.is_empty()).then(|| proto::Room {
            sid: info.room_id.clone(),
            name: info.room_name.clone(),
            ..proto::Room::default()
        });
        self.webhooks
            .send(&info.egress_id, self.event(event, room, Some(info.clone())));
    }

    /// A new egress was stored: `egress_started`, then ACTIVE after `active_after`, and the
    /// end after `egress_duration` when one is set.
    pub(super) fn stored(self: &Arc<Self>, info: &proto::EgressInfo) {
        self.egress_webhook("egress_started", info);
        let id = info.egress_id.clone();
        let active_after = self.options.timing.active_after;
        self.after(active_after, id.clone(), |inner, id| inner.activate(id));
        if let Some(duration) = self.options.egress_duration {
            self.after(duration, id, |inner, id| {
                inner.end(id);
            });
        }
    }

    /// Runs `then` after `delay` unless the stand-in stops first.
    pub(super) fn after(
        self: &Arc<Self>,
        delay: Duration,
        id: String,
        then: impl FnOnce(&Arc<Inner>, &str) + Send + 'static,
    ) {
        let weak: Weak<Inner> = Arc::downgrade(self);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(delay) => {
                    if let Some(inner) = weak.upgrade() {
                        then(&inner, &id);
                    }
                }
            }
        });
    }

    /// STARTING -> ACTIVE, `egress_updated`.
    fn activate(&self, id: &str) {
        let info = {
            let mut state = self.state();
            let Some(egress) = state.egress.get_mut(id) else {
                return;
            };
            if egress.orphaned || egress.info.status != Status::EgressStarting as i32 {
                return;
            }
            egress.info.status = Status::EgressActive as i32;
            egress.info.updated_at = unix_nanos();
            egress.info.clone()
        };
        self.egress_webhook("egress_updated", &info);
    }

    /// STARTING or ACTIVE -> ENDING (`egress_updated`), COMPLETE after `ending_for`.
    pub(super) fn end(self: &Arc<Self>, id: &str) -> bool {
        let info = {
            let mut state = self.state();
            let Some(egress) = state.egress.get_mut(id) else {
                return false;
            };
            if egress.orphaned || !is_running(&egress.info) {
                return false;
            }
            egress.info.status = Status::EgressEnding as i32;
            egress.info.updated_at = unix_nanos();
            egress.info.clone()
        };
        self.egress_webhook("egress_updated", &info);
        self.after(
            self.options.timing.ending_for,
            id.to_owned(),
            |inner, id| {
                inner.finish(id, Status::EgressComplete, "");
            },
        );
        true
    }

    /// A final status: COMPLETE or FAILED from any status not ended, ABORTED from STARTING
    /// only; the pods' jobs end and `egress_ended` is sent.
    pub(super) fn finish(
        &self,
        id: &str,
        status: Status,
        error: &str,
    ) -> Option<proto::EgressInfo> {
        let info = {
            let mut state = self.state();
            let super::ServerState { egress, pods, .. } = &mut *state;
            let egress = egress.get_mut(id)?;
            let allowed = match status {
                Status::EgressAborted => egress.info.status == Status::EgressStarting as i32,
                _ => is_listed_active(&egress.info),
            };
            if egress.orphaned || !allowed {
                return None;
            }
            let now = unix_nanos();
            egress.info.status = status as i32;
            egress.info.error = error.to_owned();
            if status == Status::EgressAborted {
                egress.info.error_code = 412;
            }
            egress.info.ended_at = now;
            egress.info.updated_at = now;
            for node_id in &egress.node_ids {
                if let Some(pod) = pods.iter().find(|pod| pod.node_id() == node_id) {
                    pod.remove_job(egress.reported_type);
                }
            }
            egress.info.clone()
        };
        self.egress_webhook("egress_ended", &info);
        Some(info)
    }

    /// The pod died under a running egress: its job goes, its record stays as it is.
    pub(super) fn orphan(&self, id: &str) -> bool {
        let mut state = self.state();
        let super::ServerState { egress, pods, .. } = &mut *state;
        let Some(egress) = egress.get_mut(id) else {
            return false;
        };
        if egress.orphaned || !is_running(&egress.info) {
            return false;
        }
        egress.orphaned = true;
        for node_id in &egress.node_ids {
            if let Some(pod) = pods.iter().find(|pod| pod.node_id() == node_id) {
                pod.remove_job(egress.reported_type);
            }
        }
        true
    }

    /// `StopEgress`: ABORTED while STARTING, ENDING while ACTIVE; `failed_precondition` once
    /// ending or ended; `not_found` when unknown; an orphan's pod never answers.
    pub(super) fn stop_egress(self: &Arc<Self>, id: &str) -> Result<proto::EgressInfo, Failure> {
        let (status, orphaned) = {
            let state = self.state();
            let egress = state
                .egress
                .get(id)
                .ok_or_else(|| Failure::new("not_found", "egress does not exist"))?;
            (egress.info.status, egress.orphaned)
        };
        if !(status == Status::EgressStarting as i32 || status == Status::EgressActive as i32) {
            let name = Status::try_from(status)
                .map(|status| status.as_str_name())
                .unwrap_or("EGRESS_UNKNOWN");
            return Err(Failure::new(
                "failed_precondition",
                &format!("egress with status {name} cannot be stopped"),
            ));
        }
        if orphaned {
            return Err(Failure::psrpc("unavailable", "no response from servers"));
        }
        if status == Status::EgressStarting as i32
            && let Some(info) = self.finish(
                id,
                Status::EgressAborted,
                "Stop called before pipeline could start",
            )
        {
            return Ok(info);
        }
        self.end(id);
        self.state()
            .egress
            .get(id)
            .map(|egress| egress.info.clone())
            .ok_or_else(|| Failure::new("not_found", "egress does not exist"))
    }
}
