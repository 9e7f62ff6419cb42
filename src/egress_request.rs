//! The LiveKit start request stored with a ticket: validated at intake against the kind's
//! protobuf message, so that the dispatcher later calls the right Twirp method with it.
//!
//! Decoding is strict: livekit-protocol's JSON decoding drops unknown fields, so a typo such
//! as `"layot"` would silently record the default layout; [`StartRequest::parse`] refuses any
//! field the message does not have, at any depth, naming it. Values LiveKit's egress would
//! refuse only once a pod has taken the job (an empty `url`, `identity` or `track_id`, a URL
//! without a usable scheme, a stream output without URLs) are refused here, at once.
//!
//! [`StartRequest::dedup_key`] says which requests are the same recording (DESIGN.md 5):
//!
//! | kind | key |
//! |---|---|
//! | room_composite, audio_room_composite | `<kind>:<room>` |
//! | web, audio_web | `<kind>:<url>` |
//! | participant | `participant:<room>:<identity>` |
//! | track_composite | `track_composite:<room>:<audio_track_id>:<video_track_id>` |
//! | track | `track:<room>:<track_id>` |
//!
//! In the keys of several parts, `%` and `:` inside a part are written `%25` and `%3A`, so
//! that no two different requests share a key.

use std::cell::RefCell;

use livekit_protocol as proto;
use serde::de::{self, IntoDeserializer};
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

/// Longest room name accepted, in bytes (livekit-server's default `max_room_name_length`).
pub const MAX_ROOM_NAME_BYTES: usize = 256;

/// Characters that would let a value start a new line, or steer a terminal, in a log or a
/// report: the C0 and C1 controls (newline, carriage return, escape, ...), DEL, and the
/// Unicode line and paragraph separators.
pub fn is_line_breaking(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Checks a room name as given by a caller: not empty, at most [`MAX_ROOM_NAME_BYTES`], no
/// whitespace at either end (Unicode spaces included: `"board\u{2003}"` is not `"board"`,
/// and neither is silently turned into the other) and no control character.
pub fn check_room_name(name: &str) -> Result<(), InvalidRequest> {
    if name.is_empty() {
        return Err(InvalidRequest("room_name must not be empty".to_owned()));
    }
    if name.len() > MAX_ROOM_NAME_BYTES {
        return Err(InvalidRequest(format!(
            "room_name is longer than {MAX_ROOM_NAME_BYTES} bytes"
        )));
    }
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return Err(InvalidRequest(format!(
            "room_name {name:?} starts or ends with whitespace"
        )));
    }
    if name.chars().any(is_line_breaking) {
        return Err(InvalidRequest(format!(
            "room_name {name:?} contains a control character"
        )));
    }
    Ok(())
}

/// An identifier LiveKit matches exactly (identity, track id): not empty, no control
/// character.
fn check_identifier(kind: EgressKind, field: &str, value: &str) -> Result<(), InvalidRequest> {
    if value.is_empty() {
        return Err(field_error(kind, field));
    }
    if value.chars().any(is_line_breaking) {
        return Err(InvalidRequest(format!(
            "{field} {value:?} contains a control character"
        )));
    }
    Ok(())
}

/// A URL: absolute, one of `schemes`, no whitespace or control character.
fn check_url(field: &str, value: &str, schemes: &[&str]) -> Result<(), InvalidRequest> {
    if value
        .chars()
        .any(|c| c.is_whitespace() || is_line_breaking(c))
    {
        return Err(InvalidRequest(format!(
            "{field} {value:?} contains whitespace or a control character"
        )));
    }
    let url = reqwest::Url::parse(value)
        .map_err(|error| InvalidRequest(format!("{field} {value:?} is not a URL: {error}")))?;
    if !schemes.contains(&url.scheme()) {
        return Err(InvalidRequest(format!(
            "{field} {value:?} must use one of the schemes {}",
            schemes.join(", ")
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(InvalidRequest(format!("{field} {value:?} has no host")));
    }
    Ok(())
}

/// Stream outputs: each names at least one URL, each URL with a scheme (`rtmp://`,
/// `rtmps://`, `srt://`, or a provider's such as `mux://`) and no whitespace.
fn check_stream_outputs<'a>(
    outputs: impl IntoIterator<Item = &'a proto::StreamOutput>,
) -> Result<(), InvalidRequest> {
    for (index, output) in outputs.into_iter().enumerate() {
        if output.urls.is_empty() {
            return Err(InvalidRequest(format!(
                "request stream output {index} has no urls"
            )));
        }
        for url in &output.urls {
            let scheme_ok = url.split_once("://").is_some_and(|(scheme, rest)| {
                !scheme.is_empty()
                    && !rest.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            });
            if !scheme_ok
                || url
                    .chars()
                    .any(|c| c.is_whitespace() || is_line_breaking(c))
            {
                return Err(InvalidRequest(format!(
                    "request stream output url {url:?} must be scheme://address without whitespace"
                )));
            }
        }
    }
    Ok(())
}

/// Decodes `value` into `T`, refusing every field `T` does not have (at any depth).
fn decode_strict<T: de::DeserializeOwned>(
    kind: EgressKind,
    value: &Value,
) -> Result<T, InvalidRequest> {
    let unknown = RefCell::new(Vec::new());
    let decoded = T::deserialize(Strict {
        value,
        path: "request".to_owned(),
        unknown: &unknown,
    })
    .map_err(|error| InvalidRequest(format!("request is not a valid {kind} request: {error}")))?;
    let unknown = unknown.into_inner();
    match unknown.as_slice() {
        [] => Ok(decoded),
        [one] => Err(InvalidRequest(format!(
            "{one} is not a field of a {kind} request"
        ))),
        many => Err(InvalidRequest(format!(
            "{} are not fields of a {kind} request",
            many.join(", ")
        ))),
    }
}

/// A JSON value deserialized for a type that records the path of every value the type
/// skips: the generated protobuf decoders skip an unknown field by reading it as
/// [`de::IgnoredAny`], and nothing else does.
struct Strict<'a> {
    value: &'a Value,
    path: String,
    unknown: &'a RefCell<Vec<String>>,
}

impl<'a> Strict<'a> {
    fn child(&self, value: &'a Value, path: String) -> Strict<'a> {
        Strict {
            value,
            path,
            unknown: self.unknown,
        }
    }
}

impl<'de> de::Deserializer<'de> for Strict<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(items) => {
                let mut seq = StrictSeq {
                    parent: &self,
                    items: items.iter().enumerate(),
                };
                let value = visitor.visit_seq(&mut seq)?;
                match seq.items.len() {
                    0 => Ok(value),
                    left => Err(de::Error::invalid_length(
                        items.len() - left,
                        &"fewer items",
                    )),
                }
            }
            Value::Object(map) => visitor.visit_map(StrictMap {
                parent: &self,
                entries: map.iter(),
                next_value: None,
            }),
        }
    }

    fn deserialize_option<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_ignored_any<V: de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.unknown.borrow_mut().push(self.path);
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            _ => self.deserialize_any(visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

struct StrictSeq<'p, 'a, I> {
    parent: &'p Strict<'a>,
    items: I,
}

impl<'de, I> de::SeqAccess<'de> for &mut StrictSeq<'_, 'de, I>
where
    I: ExactSizeIterator<Item = (usize, &'de Value)>,
{
    type Error = serde_json::Error;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        match self.items.next() {
            None => Ok(None),
            Some((index, value)) => {
                let path = format!("{}[{index}]", self.parent.path);
                seed.deserialize(self.parent.child(value, path)).map(Some)
            }
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct StrictMap<'p, 'a> {
    parent: &'p Strict<'a>,
    entries: serde_json::map::Iter<'a>,
    next_value: Option<(&'a String, &'a Value)>,
}

impl<'de> de::MapAccess<'de> for StrictMap<'_, 'de> {
    type Error = serde_json::Error;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        match self.entries.next() {
            None => Ok(None),
            Some((key, value)) => {
                self.next_value = Some((key, value));
                let key: de::value::BorrowedStrDeserializer<'de, serde_json::Error> =
                    de::value::BorrowedStrDeserializer::new(key);
                seed.deserialize(key).map(Some)
            }
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let (key, value) = self
            .next_value
            .take()
            .ok_or_else(|| de::Error::custom("a value was asked for before its key"))?;
        let path = format!("{}.{key}", self.parent.path);
        seed.deserialize(self.parent.child(value, path))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// One part of a de-duplication key of several parts: `%` and `:` escaped.
fn key_part(part: &str) -> String {
    part.replace('%', "%25").replace(':', "%3A")
}

impl StartRequest {
    /// Validates `request` (protobuf JSON, may be absent) for `kind` and `room_name`; fills the
    /// room name in and makes `audio_only` agree with the kind. Refuses unknown fields, a
    /// room name [`check_room_name`] refuses, and values LiveKit would refuse (see the
    /// module's notes).
    pub fn parse(
        kind: EgressKind,
        room_name: &str,
        request: Option<Value>,
    ) -> Result<Self, InvalidRequest> {
        check_room_name(room_name)?;
        let request = request.unwrap_or_else(|| Value::Object(Default::default()));
        if !request.is_object() {
            return Err(InvalidRequest("request must be a JSON object".to_owned()));
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
                let mut parsed: proto::RoomCompositeEgressRequest = decode_strict(kind, &request)?;
                check_room(&mut parsed.room_name)?;
                check_audio(&mut parsed.audio_only)?;
                if !parsed.custom_base_url.is_empty() {
                    check_url(
                        "request.custom_base_url",
                        &parsed.custom_base_url,
                        &["http", "https"],
                    )?;
                }
                use proto::room_composite_egress_request::Output;
                #[allow(deprecated)]
                let legacy = match &parsed.output {
                    Some(Output::Stream(stream)) => Some(stream),
                    _ => None,
                };
                check_stream_outputs(parsed.stream_outputs.iter().chain(legacy))?;
                StartRequest::RoomComposite(parsed)
            }
            EgressKind::Web | EgressKind::AudioWeb => {
                let mut parsed: proto::WebEgressRequest = decode_strict(kind, &request)?;
                if parsed.url.is_empty() {
                    return Err(field_error(kind, "request.url"));
                }
                check_url("request.url", &parsed.url, &["http", "https"])?;
                check_audio(&mut parsed.audio_only)?;
                use proto::web_egress_request::Output;
                #[allow(deprecated)]
                let legacy = match &parsed.output {
                    Some(Output::Stream(stream)) => Some(stream),
                    _ => None,
                };
                check_stream_outputs(parsed.stream_outputs.iter().chain(legacy))?;
                StartRequest::Web(parsed)
            }
            EgressKind::Participant => {
                let mut parsed: proto::ParticipantEgressRequest = decode_strict(kind, &request)?;
                check_room(&mut parsed.room_name)?;
                check_identifier(kind, "request.identity", &parsed.identity)?;
                check_stream_outputs(&parsed.stream_outputs)?;
                StartRequest::Participant(parsed)
            }
            EgressKind::TrackComposite => {
                let mut parsed: proto::TrackCompositeEgressRequest = decode_strict(kind, &request)?;
                check_room(&mut parsed.room_name)?;
                if parsed.audio_track_id.is_empty() && parsed.video_track_id.is_empty() {
                    return Err(field_error(
                        kind,
                        "request.audio_track_id or request.video_track_id",
                    ));
                }
                for (field, id) in [
                    ("request.audio_track_id", &parsed.audio_track_id),
                    ("request.video_track_id", &parsed.video_track_id),
                ] {
                    if !id.is_empty() {
                        check_identifier(kind, field, id)?;
                    }
                }
                use proto::track_composite_egress_request::Output;
                #[allow(deprecated)]
                let legacy = match &parsed.output {
                    Some(Output::Stream(stream)) => Some(stream),
                    _ => None,
                };
                check_stream_outputs(parsed.stream_outputs.iter().chain(legacy))?;
                StartRequest::TrackComposite(parsed)
            }
            EgressKind::Track => {
                let mut parsed: proto::TrackEgressRequest = decode_strict(kind, &request)?;
                check_room(&mut parsed.room_name)?;
                check_identifier(kind, "request.track_id", &parsed.track_id)?;
                if let Some(proto::track_egress_request::Output::WebsocketUrl(url)) = &parsed.output
                {
                    check_url("request.websocket_url", url, &["ws", "wss"])?;
                }
                StartRequest::Track(parsed)
            }
        })
    }

    /// The de-duplication key of the recording this request makes (the table in the module
    /// notes): two requests get the same key exactly when they record the same thing.
    pub fn dedup_key(&self) -> String {
        let kind = self.kind();
        match self {
            StartRequest::RoomComposite(request) => format!("{kind}:{}", request.room_name),
            StartRequest::Web(request) => format!("{kind}:{}", request.url),
            StartRequest::Participant(request) => format!(
                "{kind}:{}:{}",
                key_part(&request.room_name),
                key_part(&request.identity)
            ),
            StartRequest::TrackComposite(request) => format!(
                "{kind}:{}:{}:{}",
                key_part(&request.room_name),
                key_part(&request.audio_track_id),
                key_part(&request.video_track_id)
            ),
            StartRequest::Track(request) => format!(
                "{kind}:{}:{}",
                key_part(&request.room_name),
                key_part(&request.track_id)
            ),
        }
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
        // Unlike livekit-protocol's own JSON decoding, unknown fields are refused, by name.
        let error = StartRequest::parse(EgressKind::RoomComposite, "a", Some(json!({"layot": 1})))
            .unwrap_err();
        assert!(error.0.contains("request.layot"), "{error}");
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

    #[test]
    fn unknown_fields_are_refused_at_any_depth_with_their_path() {
        let error = StartRequest::parse(
            EgressKind::RoomComposite,
            "a",
            Some(json!({"fileOutputs": [{"filepath": "x.mp4", "filepth": "y"}]})),
        )
        .unwrap_err();
        assert!(
            error.0.contains("request.fileOutputs[0].filepth"),
            "{error}"
        );
        let error = StartRequest::parse(
            EgressKind::Track,
            "a",
            Some(json!({"trackId": "TR_1", "file": {"filepath": "a", "bogus": null}, "x": 1})),
        )
        .unwrap_err();
        assert!(
            error
                .0
                .contains("request.file.bogus, request.x are not fields"),
            "{error}"
        );
        // Both spellings protobuf JSON allows, enums by name or number, nested outputs,
        // maps of free keys and 64-bit numbers as strings stay accepted.
        let parsed = StartRequest::parse(
            EgressKind::RoomComposite,
            "a",
            Some(json!({
                "room_name": "a", "layout": "speaker", "audioMixing": "DUAL_CHANNEL_AGENT",
                "file_outputs": [{"fileType": 1, "filepath": "r.mp4",
                    "s3": {"bucket": "b", "metadata": {"any-key": "v"}}}],
                "segmentOutputs": [{"filenamePrefix": "p", "segmentDuration": 6}],
                "advanced": {"width": 1280, "height": 720, "keyFrameInterval": 2.5},
            })),
        )
        .unwrap();
        let again = StartRequest::parse(
            EgressKind::RoomComposite,
            "a",
            Some(serde_json::from_str(&parsed.to_json()).unwrap()),
        )
        .unwrap();
        assert_eq!(
            parsed, again,
            "the stored form parses back to the same request"
        );
    }

    #[test]
    fn room_names_are_taken_exactly_or_refused() {
        for bad in [
            "",
            " board",
            "board ",
            "board\u{2003}",
            "\u{00a0}board",
            "board\n",
            "a\nb",
            "a\rb",
            "a\u{1b}[31mb",
            "a\u{85}b",
            "a\u{2028}b",
            &"x".repeat(MAX_ROOM_NAME_BYTES + 1),
        ] {
            let error = StartRequest::parse(EgressKind::RoomComposite, bad, None).unwrap_err();
            assert!(error.0.contains("room_name"), "{bad:?}: {error}");
        }
        for good in [
            "board",
            "team a",
            "équipe-7",
            &"x".repeat(MAX_ROOM_NAME_BYTES),
        ] {
            assert!(
                StartRequest::parse(EgressKind::RoomComposite, good, None).is_ok(),
                "{good:?}"
            );
        }
    }

    #[test]
    fn values_livekit_would_refuse_are_refused_naming_the_field() {
        let refused = |kind, request: Value, field: &str| {
            let error = StartRequest::parse(kind, "a", Some(request.clone())).unwrap_err();
            assert!(error.0.contains(field), "{request}: {error}");
        };
        refused(EgressKind::Web, json!({"url": ""}), "request.url");
        refused(
            EgressKind::Web,
            json!({"url": "file:///etc/passwd"}),
            "request.url",
        );
        refused(
            EgressKind::Web,
            json!({"url": "example.com/page"}),
            "request.url",
        );
        refused(
            EgressKind::AudioWeb,
            json!({"url": "https://a b"}),
            "request.url",
        );
        refused(
            EgressKind::Participant,
            json!({"identity": ""}),
            "request.identity",
        );
        refused(
            EgressKind::Participant,
            json!({"identity": "b\nob"}),
            "request.identity",
        );
        refused(
            EgressKind::Track,
            json!({"trackId": ""}),
            "request.track_id",
        );
        refused(
            EgressKind::Track,
            json!({"trackId": "TR_1", "websocketUrl": "http://h/x"}),
            "request.websocket_url",
        );
        refused(
            EgressKind::TrackComposite,
            json!({"audioTrackId": "TR_a", "videoTrackId": "TR\tv"}),
            "request.video_track_id",
        );
        refused(
            EgressKind::RoomComposite,
            json!({"streamOutputs": [{"protocol": "RTMP", "urls": []}]}),
            "stream output",
        );
        refused(
            EgressKind::RoomComposite,
            json!({"stream": {"urls": ["live.example.com/app"]}}),
            "stream output url",
        );
        refused(
            EgressKind::RoomComposite,
            json!({"customBaseUrl": "javascript:alert(1)"}),
            "request.custom_base_url",
        );
        assert!(
            StartRequest::parse(
                EgressKind::RoomComposite,
                "a",
                Some(json!({"streamOutputs": [{"protocol": "RTMP",
                    "urls": ["rtmps://live.example.com/app/key", "mux://key"]}]}))
            )
            .is_ok()
        );
        assert!(
            StartRequest::parse(
                EgressKind::Track,
                "a",
                Some(json!({"trackId": "TR_1", "websocketUrl": "wss://h/x"}))
            )
            .is_ok()
        );
    }

    fn parse(kind: EgressKind, room: &str, request: Value) -> StartRequest {
        StartRequest::parse(kind, room, Some(request)).unwrap()
    }

    #[test]
    fn the_key_follows_what_is_recorded() {
        let participant = |room: &str, who: &str| {
            parse(EgressKind::Participant, room, json!({ "identity": who })).dedup_key()
        };
        assert_eq!(participant("standup", "bob"), "participant:standup:bob");
        assert_ne!(
            participant("standup", "bob"),
            participant("standup", "alice")
        );
        // ':' inside a part cannot move the boundary between room and identity.
        assert_ne!(participant("a:b", "c"), participant("a", "b:c"));
        assert_ne!(participant("a%3Ab", "c"), participant("a:b", "c"));
        assert_eq!(
            parse(
                EgressKind::RoomComposite,
                "standup",
                json!({"layout": "grid"})
            )
            .dedup_key(),
            "room_composite:standup",
            "the layout is not part of what is recorded"
        );
        assert_eq!(
            parse(
                EgressKind::AudioWeb,
                "r",
                json!({"url": "https://x.test/a"})
            )
            .dedup_key(),
            "audio_web:https://x.test/a"
        );
        assert_eq!(
            parse(
                EgressKind::TrackComposite,
                "r",
                json!({"audioTrackId": "TR_a"})
            )
            .dedup_key(),
            "track_composite:r:TR_a:"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Room names the parser accepts: printable, no whitespace at the ends, ':' and '%'
        /// included to probe the key's escaping.
        fn room() -> impl Strategy<Value = String> {
            "[a-z0-9:%]([a-z0-9 :%_-]{0,10}[a-z0-9:%])?"
        }

        fn id() -> impl Strategy<Value = String> {
            "[A-Za-z0-9:%_]{1,8}"
        }

        fn url() -> impl Strategy<Value = String> {
            "[a-z]{1,6}(:[1-9][0-9])?(/[a-z0-9:%]{0,6}){0,2}".prop_map(|rest| {
                let rest = rest.replacen(':', ".test:", 1);
                if rest.contains(".test") {
                    format!("https://{rest}")
                } else {
                    format!("https://{rest}.test")
                }
            })
        }

        /// A request of any kind, its key parts drawn from the strategies above, and a
        /// layout or output that does not change the key.
        fn request() -> impl Strategy<Value = (EgressKind, String, Value)> {
            let extra = prop_oneof![
                Just(json!({})),
                Just(json!({"fileOutputs": [{"filepath": "x.mp4"}]})),
            ];
            (0usize..7, room(), id(), id(), url(), extra).prop_map(
                |(kind, room, id1, id2, url, extra)| {
                    let kind = EgressKind::ALL[kind];
                    let mut request = match kind {
                        EgressKind::RoomComposite | EgressKind::AudioRoomComposite => json!({}),
                        EgressKind::Web | EgressKind::AudioWeb => json!({ "url": url }),
                        EgressKind::Participant => json!({ "identity": id1 }),
                        EgressKind::TrackComposite => {
                            json!({ "audioTrackId": id1, "videoTrackId": id2 })
                        }
                        EgressKind::Track => json!({ "trackId": id1 }),
                    };
                    if kind != EgressKind::Track {
                        for (key, value) in extra.as_object().unwrap() {
                            request[key] = value.clone();
                        }
                    }
                    (kind, room, request)
                },
            )
        }

        /// The fields of DESIGN.md 5's table, as the key sees them.
        fn identity(kind: EgressKind, room: &str, request: &Value) -> Vec<String> {
            let field = |name: &str| request[name].as_str().unwrap_or("").to_owned();
            match kind {
                EgressKind::RoomComposite | EgressKind::AudioRoomComposite => {
                    vec![kind.to_string(), room.to_owned()]
                }
                EgressKind::Web | EgressKind::AudioWeb => vec![kind.to_string(), field("url")],
                EgressKind::Participant => {
                    vec![kind.to_string(), room.to_owned(), field("identity")]
                }
                EgressKind::TrackComposite => vec![
                    kind.to_string(),
                    room.to_owned(),
                    field("audioTrackId"),
                    field("videoTrackId"),
                ],
                EgressKind::Track => vec![kind.to_string(), room.to_owned(), field("trackId")],
            }
        }

        proptest! {
            #[test]
            fn equal_requests_give_equal_keys((kind, room, request) in request()) {
                let a = StartRequest::parse(kind, &room, Some(request.clone())).unwrap();
                let b = StartRequest::parse(kind, &room, Some(request)).unwrap();
                prop_assert_eq!(a.dedup_key(), b.dedup_key());
                // The stored form gives the key back.
                let stored: Value = serde_json::from_str(&a.to_json()).unwrap();
                let c = StartRequest::parse(kind, &room, Some(stored)).unwrap();
                prop_assert_eq!(a.dedup_key(), c.dedup_key());
            }

            #[test]
            fn keys_differ_exactly_when_a_field_of_the_table_differs(
                (kind_a, room_a, request_a) in request(),
                (kind_b, room_b, request_b) in request(),
            ) {
                let a = StartRequest::parse(kind_a, &room_a, Some(request_a.clone())).unwrap();
                let b = StartRequest::parse(kind_b, &room_b, Some(request_b.clone())).unwrap();
                let same_recording =
                    identity(kind_a, &room_a, &request_a) == identity(kind_b, &room_b, &request_b);
                prop_assert_eq!(a.dedup_key() == b.dedup_key(), same_recording);
            }

            #[test]
            fn changing_one_field_of_the_table_changes_the_key(
                (kind, room, request) in request(),
                other in id(),
            ) {
                let base = StartRequest::parse(kind, &room, Some(request.clone())).unwrap();
                let field = match kind {
                    EgressKind::RoomComposite | EgressKind::AudioRoomComposite => None,
                    EgressKind::Web | EgressKind::AudioWeb => Some("url"),
                    EgressKind::Participant => Some("identity"),
                    EgressKind::TrackComposite => Some("videoTrackId"),
                    EgressKind::Track => Some("trackId"),
                };
                // The room always counts, except for web egress, which records a URL.
                if !matches!(kind, EgressKind::Web | EgressKind::AudioWeb) {
                    let moved = format!("{room}-x");
                    let changed = StartRequest::parse(kind, &moved, Some(request.clone())).unwrap();
                    prop_assert_ne!(base.dedup_key(), changed.dedup_key());
                }
                if let Some(field) = field {
                    let mut changed = request.clone();
                    let value = if field == "url" {
                        format!("{}/{other}", request["url"].as_str().unwrap())
                    } else {
                        format!("{}{other}", request[field].as_str().unwrap())
                    };
                    changed[field] = json!(value);
                    let changed = StartRequest::parse(kind, &room, Some(changed)).unwrap();
                    prop_assert_ne!(base.dedup_key(), changed.dedup_key());
                }
            }
        }
    }
}
