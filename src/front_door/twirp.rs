//! Twirp's wire vocabulary as livekit-server speaks it: error codes with their HTTP status,
//! the JSON error body, the two encodings, and the start requests decoded into
//! [`StartRequest`] by the same validation as `POST /v1/requests`.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use livekit_protocol as proto;
use prost::Message;
use serde_json::{Value, json};

use crate::egress_request::{MAX_ROOM_NAME_BYTES, StartRequest};
use crate::model::EgressKind;

/// A Twirp error code (twirp v8, the codes livekit-server answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    Malformed,
    DeadlineExceeded,
    NotFound,
    BadRoute,
    AlreadyExists,
    PermissionDenied,
    Unauthenticated,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
}

impl Code {
    /// Every code.
    pub const ALL: [Code; 18] = [
        Code::Canceled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::Malformed,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::BadRoute,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::Unauthenticated,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
    ];

    /// The code as the error body spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::Malformed => "malformed",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::BadRoute => "bad_route",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::Unauthenticated => "unauthenticated",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "dataloss",
        }
    }

    /// The code spelled `name`, if it is one.
    pub fn parse(name: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|code| code.as_str() == name)
    }

    /// The HTTP status Twirp answers the code with.
    pub fn status(self) -> StatusCode {
        match self {
            Code::Canceled | Code::DeadlineExceeded => StatusCode::REQUEST_TIMEOUT,
            Code::InvalidArgument | Code::Malformed | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound | Code::BadRoute => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A Twirp error answer: `{"code", "msg", "meta"?}` in JSON, whatever the request's encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwirpError {
    /// The code.
    pub code: Code,
    /// The message.
    pub msg: String,
    /// Extra strings (`ticket`, `position`, `argument`); left out of the body when empty.
    pub meta: BTreeMap<String, String>,
}

impl TwirpError {
    /// An error without meta.
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        TwirpError {
            code,
            msg: msg.into(),
            meta: BTreeMap::new(),
        }
    }

    /// Adds one meta entry.
    pub fn with_meta(mut self, key: &str, value: impl Into<String>) -> Self {
        self.meta.insert(key.to_owned(), value.into());
        self
    }

    /// `invalid_argument` about `argument` (Twirp's own `InvalidArgumentError` shape).
    pub fn invalid_argument(argument: &str, msg: impl Into<String>) -> Self {
        TwirpError::new(Code::InvalidArgument, msg).with_meta("argument", argument)
    }
}

impl IntoResponse for TwirpError {
    fn into_response(self) -> Response {
        let mut body = json!({ "code": self.code.as_str(), "msg": self.msg });
        if !self.meta.is_empty() {
            body["meta"] = json!(self.meta);
        }
        // Exactly `application/json`: the Node SDK reads the body as JSON only then.
        (
            self.code.status(),
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body.to_string(),
        )
            .into_response()
    }
}

/// The two encodings Twirp serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/json`: protobuf JSON (camelCase or the proto field names).
    Json,
    /// `application/protobuf`: protobuf binary.
    Protobuf,
}

impl Encoding {
    /// The encoding named by the request's `Content-Type`; anything else is `bad_route`, as
    /// Twirp answers it.
    pub fn of(headers: &HeaderMap) -> Result<Encoding, TwirpError> {
        let value = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("");
        let media = value.split(';').next().unwrap_or("").trim();
        if media.eq_ignore_ascii_case("application/json") {
            Ok(Encoding::Json)
        } else if media.eq_ignore_ascii_case("application/protobuf") {
            Ok(Encoding::Protobuf)
        } else {
            Err(TwirpError::new(
                Code::BadRoute,
                format!("unexpected Content-Type: {value:?}"),
            ))
        }
    }

    /// The `Content-Type` of an answer in this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => "application/json",
            Encoding::Protobuf => "application/protobuf",
        }
    }

    /// An `EgressInfo` answer (200) in this encoding.
    pub fn answer(self, info: &proto::EgressInfo) -> Response {
        let body = match self {
            Encoding::Json => serde_json::to_vec(info).expect("protobuf messages encode as JSON"),
            Encoding::Protobuf => info.encode_to_vec(),
        };
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, self.content_type())],
            body,
        )
            .into_response()
    }
}

/// The start methods the front door queues, with the request message each takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMethod {
    /// `StartRoomCompositeEgress`.
    RoomComposite,
    /// `StartWebEgress`.
    Web,
    /// `StartParticipantEgress`.
    Participant,
    /// `StartTrackCompositeEgress`.
    TrackComposite,
    /// `StartTrackEgress`.
    Track,
}

impl StartMethod {
    /// The start method called `method`, if it is one the front door queues.
    pub fn of(method: &str) -> Option<StartMethod> {
        Some(match method {
            "StartRoomCompositeEgress" => StartMethod::RoomComposite,
            "StartWebEgress" => StartMethod::Web,
            "StartParticipantEgress" => StartMethod::Participant,
            "StartTrackCompositeEgress" => StartMethod::TrackComposite,
            "StartTrackEgress" => StartMethod::Track,
            _ => return None,
        })
    }

    /// The body decoded as this method's message and turned into protobuf JSON.
    fn to_json(self, encoding: Encoding, body: &[u8]) -> Result<Value, TwirpError> {
        fn binary<M: Message + Default + serde::Serialize>(body: &[u8]) -> Result<Value, String> {
            let message = M::decode(body).map_err(|error| error.to_string())?;
            serde_json::to_value(&message).map_err(|error| error.to_string())
        }
        let decoded = match encoding {
            Encoding::Json => serde_json::from_slice::<Value>(body).map_err(|e| e.to_string()),
            Encoding::Protobuf => match self {
                StartMethod::RoomComposite => binary::<proto::RoomCompositeEgressRequest>(body),
                StartMethod::Web => binary::<proto::WebEgressRequest>(body),
                StartMethod::Participant => binary::<proto::ParticipantEgressRequest>(body),
                StartMethod::TrackComposite => binary::<proto::TrackCompositeEgressRequest>(body),
                StartMethod::Track => binary::<proto::TrackEgressRequest>(body),
            },
        };
        let value = decoded.map_err(|error| {
            TwirpError::new(
                Code::Malformed,
                format!("the request body could not be decoded: {error}"),
            )
        })?;
        if !value.is_object() {
            return Err(TwirpError::new(
                Code::Malformed,
                "the request body must be a JSON object",
            ));
        }
        Ok(value)
    }
}

/// A validated start call: the request as the queue stores it, and the room name the
/// ticket carries (the URL, cut to a room name's length, for web egress).
#[derive(Debug, Clone, PartialEq)]
pub struct StartCall {
    /// The request.
    pub request: StartRequest,
    /// The ticket's room name.
    pub room_name: String,
}

/// Reads a field by its JSON name or its proto name.
fn field<'a>(value: &'a Value, json_name: &str, proto_name: &str) -> Option<&'a Value> {
    value.get(json_name).or_else(|| value.get(proto_name))
}

/// Decodes and validates the body of a start call, as `POST /v1/requests` validates its
/// `request`: unknown fields (in JSON) and values LiveKit would refuse are `invalid_argument`
/// naming the field; a body that does not decode is `malformed`.
pub fn decode_start(
    method: StartMethod,
    encoding: Encoding,
    body: &[u8],
) -> Result<StartCall, TwirpError> {
    let value = method.to_json(encoding, body)?;
    let audio_only = field(&value, "audioOnly", "audio_only")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let text = |json_name, proto_name| {
        field(&value, json_name, proto_name)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let (kind, room_name) = match method {
        StartMethod::Web => {
            let url = text("url", "url");
            if url.is_empty() {
                return Err(TwirpError::invalid_argument("url", "url must not be empty"));
            }
            let kind = if audio_only {
                EgressKind::AudioWeb
            } else {
                EgressKind::Web
            };
            (kind, room_label(&url))
        }
        _ => {
            let room = text("roomName", "room_name");
            if room.is_empty() {
                return Err(TwirpError::invalid_argument(
                    "room_name",
                    "room_name must not be empty",
                ));
            }
            let kind = match method {
                StartMethod::RoomComposite if audio_only => EgressKind::AudioRoomComposite,
                StartMethod::RoomComposite => EgressKind::RoomComposite,
                StartMethod::Participant => EgressKind::Participant,
                StartMethod::TrackComposite => EgressKind::TrackComposite,
                _ => EgressKind::Track,
            };
            (kind, room)
        }
    };
    let request = StartRequest::parse(kind, &room_name, Some(value))
        .map_err(|error| invalid_request(&error.0))?;
    Ok(StartCall { request, room_name })
}

/// `invalid_argument` for a refusal of [`StartRequest::parse`], naming the field: the HTTP
/// API nests the request under `request.`, here it is the whole body.
fn invalid_request(text: &str) -> TwirpError {
    let argument = match text.split_once("request.") {
        Some((_, rest)) => rest
            .split(|c: char| !(c.is_ascii_alphanumeric() || "_.[]".contains(c)))
            .next()
            .unwrap_or(""),
        None if text.starts_with("room_name") => "room_name",
        None => "",
    };
    TwirpError::invalid_argument(argument, text.replace("request.", ""))
}

/// The room name a web egress's ticket carries: its URL, cut at a character boundary to the
/// longest room name.
fn room_label(url: &str) -> String {
    let mut end = url.len().min(MAX_ROOM_NAME_BYTES);
    while !url.is_char_boundary(end) {
        end -= 1;
    }
    url[..end].to_owned()
}

/// The Twirp code of a failure text the dispatcher stored (`... livekit-server answered
/// <code>: <msg>`), or `unknown` when LiveKit gave none (an egress that failed after it
/// started).
pub fn code_of_failure(error: &str) -> Code {
    error
        .rsplit_once("livekit-server answered ")
        .and_then(|(_, rest)| rest.split(':').next())
        .and_then(Code::parse)
        .unwrap_or(Code::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_twirps_status() {
        assert_eq!(Code::Unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Code::Canceled.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(Code::Unauthenticated.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            Code::ResourceExhausted.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        for code in Code::ALL {
            assert_eq!(Code::parse(code.as_str()), Some(code));
        }
    }

    #[test]
    fn json_and_protobuf_bodies_give_the_same_request() {
        let message = proto::RoomCompositeEgressRequest {
            room_name: "standup".to_owned(),
            layout: "speaker".to_owned(),
            ..Default::default()
        };
        let binary = decode_start(
            StartMethod::RoomComposite,
            Encoding::Protobuf,
            &message.encode_to_vec(),
        )
        .unwrap();
        let json = decode_start(
            StartMethod::RoomComposite,
            Encoding::Json,
            br#"{"roomName":"standup","layout":"speaker"}"#,
        )
        .unwrap();
        assert_eq!(binary, json);
        assert_eq!(json.room_name, "standup");
        assert_eq!(json.request.kind(), EgressKind::RoomComposite);
    }

    #[test]
    fn audio_only_is_its_own_kind() {
        let call = decode_start(
            StartMethod::RoomComposite,
            Encoding::Json,
            br#"{"room_name":"standup","audio_only":true}"#,
        )
        .unwrap();
        assert_eq!(call.request.kind(), EgressKind::AudioRoomComposite);
    }

    #[test]
    fn bad_input_names_the_field() {
        let error =
            decode_start(StartMethod::Track, Encoding::Json, br#"{"roomName":"a"}"#).unwrap_err();
        assert_eq!(error.code, Code::InvalidArgument);
        assert!(error.msg.contains("track_id"), "{error:?}");
        assert_eq!(error.meta["argument"], "track_id");
        let error = decode_start(
            StartMethod::RoomComposite,
            Encoding::Json,
            br#"{"layout":"x"}"#,
        )
        .unwrap_err();
        assert_eq!(error.meta["argument"], "room_name");
        let error = decode_start(
            StartMethod::RoomComposite,
            Encoding::Json,
            br#"{"roomName":"a","layot":"x"}"#,
        )
        .unwrap_err();
        assert_eq!(error.code, Code::InvalidArgument);
        assert!(error.msg.contains("layot"), "{error:?}");
        let error = decode_start(StartMethod::Web, Encoding::Protobuf, b"\xff\xff").unwrap_err();
        assert_eq!(error.code, Code::Malformed);
    }

    #[test]
    fn a_failure_keeps_livekits_code() {
        assert_eq!(
            code_of_failure(
                "the room did not exist for 60s: livekit-server answered not_found: twirp error unknown: requested room does not exist"
            ),
            Code::NotFound
        );
        assert_eq!(
            code_of_failure(
                "livekit-server refused the request: livekit-server answered invalid_argument: bad"
            ),
            Code::InvalidArgument
        );
        assert_eq!(
            code_of_failure("egress EG_1 ended EGRESS_FAILED: boom"),
            Code::Unknown
        );
    }
}
