//! The start request as livekit-server stores and lists it: credentials and stream keys
//! redacted, as the egress pod does before it reports the `EgressInfo` (LiveKit protocol,
//! `egress/redact.go` and `utils/redact.go`).
//!
//! What is replaced, and by what:
//! - uploads (S3, GCP, Azure, AliOSS): every non-empty secret field by its name in braces,
//!   `{access_key}`, `{secret}`, `{session_token}`, `{external_id}`, `{credentials}`,
//!   `{account_name}`, `{account_key}`; an empty field stays empty;
//! - stream URLs: the key of `rtmp(s)://host/.../app/KEY` and the whole authority of
//!   `mux://KEY` and `twitch://KEY` become `{abc...xyz}` (at most three characters of each end);
//!   any other URL has every query value replaced by `{...}`;
//! - a track egress's websocket URL: every query value replaced by `{...}`.
//!
//! LiveKit redacts a list of outputs only when it holds exactly one entry (a request may carry
//! at most one output of each type), and the deprecated single `output` of room composite, web
//! and track composite requests. Webhook signing keys and proxy passwords are kept, as there.
//! Redacting twice gives what redacting once gives: a key already in the `{abc...xyz}` form is
//! kept (LiveKit would wrap it again, but it only ever redacts a request as sent), so a listed
//! request may be compared with `redact` of ours whether or not it went through `redact` too.

use livekit_protocol as proto;

use crate::egress_request::StartRequest;

/// The request as livekit-server lists it: `request` with its secrets and stream keys redacted.
pub fn redact(request: &StartRequest) -> StartRequest {
    let mut redacted = request.clone();
    match &mut redacted {
        StartRequest::RoomComposite(request) => {
            redact_encoded(
                &mut request.file_outputs,
                &mut request.segment_outputs,
                &mut request.stream_outputs,
                &mut request.image_outputs,
            );
            use proto::room_composite_egress_request::Output;
            #[allow(deprecated)]
            match &mut request.output {
                Some(Output::File(file)) => redact_file_output(file),
                Some(Output::Stream(stream)) => redact_stream_output(stream),
                Some(Output::Segments(segments)) => redact_segment_output(segments),
                None => {}
            }
        }
        StartRequest::Web(request) => {
            redact_encoded(
                &mut request.file_outputs,
                &mut request.segment_outputs,
                &mut request.stream_outputs,
                &mut request.image_outputs,
            );
            use proto::web_egress_request::Output;
            #[allow(deprecated)]
            match &mut request.output {
                Some(Output::File(file)) => redact_file_output(file),
                Some(Output::Stream(stream)) => redact_stream_output(stream),
                Some(Output::Segments(segments)) => redact_segment_output(segments),
                None => {}
            }
        }
        StartRequest::Participant(request) => redact_encoded(
            &mut request.file_outputs,
            &mut request.segment_outputs,
            &mut request.stream_outputs,
            &mut request.image_outputs,
        ),
        StartRequest::TrackComposite(request) => {
            redact_encoded(
                &mut request.file_outputs,
                &mut request.segment_outputs,
                &mut request.stream_outputs,
                &mut request.image_outputs,
            );
            use proto::track_composite_egress_request::Output;
            #[allow(deprecated)]
            match &mut request.output {
                Some(Output::File(file)) => redact_file_output(file),
                Some(Output::Stream(stream)) => redact_stream_output(stream),
                Some(Output::Segments(segments)) => redact_segment_output(segments),
                None => {}
            }
        }
        StartRequest::Track(request) => {
            use proto::track_egress_request::Output;
            match &mut request.output {
                Some(Output::File(file)) => {
                    use proto::direct_file_output::Output as Upload;
                    match &mut file.output {
                        Some(Upload::S3(s3)) => redact_s3(s3),
                        Some(Upload::Gcp(gcp)) => redact_gcp(gcp),
                        Some(Upload::Azure(azure)) => redact_azure(azure),
                        Some(Upload::AliOss(oss)) => redact_ali_oss(oss),
                        None => {}
                    }
                }
                Some(Output::WebsocketUrl(url)) => *url = redact_url_query_values(url),
                None => {}
            }
        }
    }
    redacted
}

/// The lists of outputs of the encoded (transcoding) requests; each is redacted only when it
/// holds exactly one entry, as LiveKit does.
fn redact_encoded(
    files: &mut [proto::EncodedFileOutput],
    segments: &mut [proto::SegmentedFileOutput],
    streams: &mut [proto::StreamOutput],
    images: &mut [proto::ImageOutput],
) {
    if let [file] = files {
        redact_file_output(file);
    }
    if let [segment] = segments {
        redact_segment_output(segment);
    }
    if let [stream] = streams {
        redact_stream_output(stream);
    }
    if let [image] = images {
        use proto::image_output::Output;
        match &mut image.output {
            Some(Output::S3(s3)) => redact_s3(s3),
            Some(Output::Gcp(gcp)) => redact_gcp(gcp),
            Some(Output::Azure(azure)) => redact_azure(azure),
            Some(Output::AliOss(oss)) => redact_ali_oss(oss),
            None => {}
        }
    }
}

fn redact_file_output(file: &mut proto::EncodedFileOutput) {
    use proto::encoded_file_output::Output;
    match &mut file.output {
        Some(Output::S3(s3)) => redact_s3(s3),
        Some(Output::Gcp(gcp)) => redact_gcp(gcp),
        Some(Output::Azure(azure)) => redact_azure(azure),
        Some(Output::AliOss(oss)) => redact_ali_oss(oss),
        None => {}
    }
}

fn redact_segment_output(segments: &mut proto::SegmentedFileOutput) {
    use proto::segmented_file_output::Output;
    match &mut segments.output {
        Some(Output::S3(s3)) => redact_s3(s3),
        Some(Output::Gcp(gcp)) => redact_gcp(gcp),
        Some(Output::Azure(azure)) => redact_azure(azure),
        Some(Output::AliOss(oss)) => redact_ali_oss(oss),
        None => {}
    }
}

fn redact_stream_output(stream: &mut proto::StreamOutput) {
    for url in &mut stream.urls {
        *url = redact_stream_url(url);
    }
}

fn redact_s3(s3: &mut proto::S3Upload) {
    replace_secret(&mut s3.access_key, "{access_key}");
    replace_secret(&mut s3.secret, "{secret}");
    replace_secret(&mut s3.assume_role_external_id, "{external_id}");
    replace_secret(&mut s3.session_token, "{session_token}");
}

fn redact_gcp(gcp: &mut proto::GcpUpload) {
    replace_secret(&mut gcp.credentials, "{credentials}");
}

fn redact_azure(azure: &mut proto::AzureBlobUpload) {
    replace_secret(&mut azure.account_name, "{account_name}");
    replace_secret(&mut azure.account_key, "{account_key}");
}

fn redact_ali_oss(oss: &mut proto::AliOssUpload) {
    replace_secret(&mut oss.access_key, "{access_key}");
    replace_secret(&mut oss.secret, "{secret}");
}

/// A set field becomes its placeholder; an empty one stays empty (so "not given" still shows).
fn replace_secret(field: &mut String, placeholder: &str) {
    if !field.is_empty() {
        *field = placeholder.to_owned();
    }
}

/// A stream URL with its key hidden: mux/twitch shorthands, then RTMP(S) URLs, then query
/// values of any other URL (SRT passphrases and stream ids); anything else is kept.
pub fn redact_stream_url(url: &str) -> String {
    for scheme in ["mux://", "twitch://"] {
        if let Some(key) = url.strip_prefix(scheme)
            && !key.is_empty()
            && !key.chars().any(char::is_whitespace)
        {
            return format!("{scheme}{}", redact_identifier(key));
        }
    }
    if let Some(redacted) = redact_rtmp_key(url) {
        return redacted;
    }
    redact_url_query_values(url)
}

/// `rtmp(s)://{host}(/{path})/{app}/{stream_key}( live=1)`: the key after the last `/` is
/// hidden. At least two slashes after the scheme are needed; a key with white space in it
/// (other than a trailing ` live=1`) or a line break anywhere means "not an RTMP URL".
fn redact_rtmp_key(url: &str) -> Option<String> {
    let scheme = if url.starts_with("rtmps://") {
        "rtmps://"
    } else if url.starts_with("rtmp://") {
        "rtmp://"
    } else {
        return None;
    };
    let rest = &url[scheme.len()..];
    if rest.contains('\n') {
        return None;
    }
    let last_slash = rest.rfind('/')?;
    // The app segment must end in a slash of its own, after the path's.
    rest[..last_slash].rfind('/')?;
    let tail = &rest[last_slash + 1..];
    let (key, live) = match tail.strip_suffix(" live=1") {
        Some(key) if !key.chars().any(char::is_whitespace) => (key, " live=1"),
        _ if !tail.chars().any(char::is_whitespace) => (tail, ""),
        _ => return None,
    };
    Some(format!(
        "{scheme}{}{}{live}",
        &rest[..=last_slash],
        redact_identifier(key)
    ))
}

/// Every query parameter value replaced by `{...}`, names kept; a URL without a query, or a
/// parameter without a value, is kept as it is.
pub fn redact_url_query_values(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    if query.is_empty() {
        return url.to_owned();
    }
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, value)) if !value.is_empty() => format!("{name}={{...}}"),
            _ => param.to_owned(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

/// `{abc...xyz}`: three characters of each end for identifiers of 9 or more, two for 6 or
/// more, one for 3 or more, none below (LiveKit counts bytes; so does this, on a character
/// boundary).
fn redact_identifier(identifier: &str) -> String {
    if is_redacted_identifier(identifier) {
        return identifier.to_owned();
    }
    let bytes = identifier.as_bytes();
    let keep = (1..=3)
        .rev()
        .find(|keep| bytes.len() >= keep * 3)
        .unwrap_or(0);
    let prefix = String::from_utf8_lossy(&bytes[..keep]);
    let suffix = String::from_utf8_lossy(&bytes[bytes.len() - keep..]);
    format!("{{{prefix}...{suffix}}}")
}

/// `{...}`, `{a...b}`, `{ab...yz}` or `{abc...xyz}`: what [`redact_identifier`] gives.
fn is_redacted_identifier(identifier: &str) -> bool {
    let Some(inner) = identifier
        .strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
    else {
        return false;
    };
    let Some((prefix, suffix)) = inner.split_once("...") else {
        return false;
    };
    prefix.len() == suffix.len() && prefix.len() <= 3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EgressKind;
    use serde_json::json;

    fn s3() -> proto::S3Upload {
        proto::S3Upload {
            access_key: "ACCESS_KEY".into(),
            secret: "LONG_SECRET_STRING".into(),
            session_token: "SESSION_TOKEN".into(),
            assume_role_external_id: "EXTERNAL_ID".into(),
            bucket: "recordings".into(),
            region: "eu-west-1".into(),
            ..Default::default()
        }
    }

    fn s3_file() -> proto::EncodedFileOutput {
        proto::EncodedFileOutput {
            filepath: "rooms/{room_name}.mp4".into(),
            output: Some(proto::encoded_file_output::Output::S3(s3())),
            ..Default::default()
        }
    }

    #[test]
    fn every_upload_provider_has_its_secrets_replaced_by_their_names() {
        let mut request = proto::RoomCompositeEgressRequest {
            room_name: "standup".into(),
            file_outputs: vec![s3_file()],
            segment_outputs: vec![proto::SegmentedFileOutput {
                output: Some(proto::segmented_file_output::Output::Gcp(
                    proto::GcpUpload {
                        credentials: "{\"private_key\":\"x\"}".into(),
                        bucket: "b".into(),
                        proxy: None,
                    },
                )),
                ..Default::default()
            }],
            image_outputs: vec![proto::ImageOutput {
                output: Some(proto::image_output::Output::AliOss(proto::AliOssUpload {
                    access_key: "ACCESS_KEY".into(),
                    secret: "SECRET".into(),
                    bucket: "b".into(),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        };
        let StartRequest::RoomComposite(redacted) =
            redact(&StartRequest::RoomComposite(request.clone()))
        else {
            panic!("kind changed")
        };
        let Some(proto::encoded_file_output::Output::S3(s3)) = &redacted.file_outputs[0].output
        else {
            panic!("output changed")
        };
        assert_eq!(
            (
                s3.access_key.as_str(),
                s3.secret.as_str(),
                s3.session_token.as_str(),
                s3.assume_role_external_id.as_str()
            ),
            (
                "{access_key}",
                "{secret}",
                "{session_token}",
                "{external_id}"
            )
        );
        assert_eq!(
            (s3.bucket.as_str(), s3.region.as_str()),
            ("recordings", "eu-west-1")
        );
        assert_eq!(redacted.file_outputs[0].filepath, "rooms/{room_name}.mp4");
        let Some(proto::segmented_file_output::Output::Gcp(gcp)) =
            &redacted.segment_outputs[0].output
        else {
            panic!("output changed")
        };
        assert_eq!(
            (gcp.credentials.as_str(), gcp.bucket.as_str()),
            ("{credentials}", "b")
        );
        let Some(proto::image_output::Output::AliOss(oss)) = &redacted.image_outputs[0].output
        else {
            panic!("output changed")
        };
        assert_eq!(
            (oss.access_key.as_str(), oss.secret.as_str()),
            ("{access_key}", "{secret}")
        );

        // Azure, and an S3 upload with only some secrets set: empty ones stay empty.
        request.file_outputs[0].output = Some(proto::encoded_file_output::Output::Azure(
            proto::AzureBlobUpload {
                account_name: "acct".into(),
                account_key: "key".into(),
                container_name: "c".into(),
            },
        ));
        request.segment_outputs[0].output =
            Some(proto::segmented_file_output::Output::S3(proto::S3Upload {
                access_key: "AK".into(),
                secret: "S".into(),
                ..Default::default()
            }));
        let StartRequest::RoomComposite(redacted) = redact(&StartRequest::RoomComposite(request))
        else {
            panic!("kind changed")
        };
        let Some(proto::encoded_file_output::Output::Azure(azure)) =
            &redacted.file_outputs[0].output
        else {
            panic!("output changed")
        };
        assert_eq!(
            (
                azure.account_name.as_str(),
                azure.account_key.as_str(),
                azure.container_name.as_str()
            ),
            ("{account_name}", "{account_key}", "c")
        );
        let Some(proto::segmented_file_output::Output::S3(s3)) =
            &redacted.segment_outputs[0].output
        else {
            panic!("output changed")
        };
        assert_eq!(
            (
                s3.session_token.as_str(),
                s3.assume_role_external_id.as_str()
            ),
            ("", "")
        );
        assert_eq!(s3.access_key, "{access_key}");
    }

    #[test]
    fn stream_keys_are_hidden_as_livekit_hides_them() {
        let cases = [
            (
                "rtmps://foo.bar.com/app/secret_stream_key",
                "rtmps://foo.bar.com/app/{sec...key}",
            ),
            (
                "rtmp://a.rtmp.youtube.com/live2/abcd-efgh-ijkl",
                "rtmp://a.rtmp.youtube.com/live2/{abc...jkl}",
            ),
            (
                "rtmp://host/path/app/key12345 live=1",
                "rtmp://host/path/app/{ke...45} live=1",
            ),
            ("rtmp://host/app/abc", "rtmp://host/app/{a...c}"),
            ("rtmp://host/app/ab", "rtmp://host/app/{...}"),
            ("rtmp://host/app/", "rtmp://host/app/{...}"),
            (
                "mux://8e0b1b9c-50a2-d893-ec0a-102056d112ae",
                "mux://{8e0...2ae}",
            ),
            (
                "twitch://live_12345678_abcdefghijklmnop",
                "twitch://{liv...nop}",
            ),
            ("srt://foo.bar.com:9999", "srt://foo.bar.com:9999"),
            (
                "srt://foo.bar.com:9999?streamid=124939da-5244&passphrase=WnxknzJTUbwYl9SpdqAudX",
                "srt://foo.bar.com:9999?streamid={...}&passphrase={...}",
            ),
            // One slash after the host is not an RTMP URL with a key: only query values go.
            ("rtmp://host/key?a=1&b", "rtmp://host/key?a={...}&b"),
            (
                "rtmp://host/app/key with space",
                "rtmp://host/app/key with space",
            ),
            ("mux://", "mux://"),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_stream_url(url), expected, "{url}");
            assert_eq!(redact_stream_url(expected), expected, "twice: {url}");
        }
    }

    #[test]
    fn only_single_outputs_and_the_deprecated_output_are_redacted() {
        let stream = proto::StreamOutput {
            protocol: 0,
            urls: vec![
                "rtmp://host/app/streamkey1".into(),
                "mux://abcdefghi".into(),
            ],
        };
        let request = proto::WebEgressRequest {
            url: "https://example.com".into(),
            file_outputs: vec![s3_file(), s3_file()],
            stream_outputs: vec![stream.clone()],
            #[allow(deprecated)]
            output: Some(proto::web_egress_request::Output::File(s3_file())),
            ..Default::default()
        };
        let StartRequest::Web(redacted) = redact(&StartRequest::Web(request.clone())) else {
            panic!("kind changed")
        };
        assert_eq!(
            redacted.file_outputs, request.file_outputs,
            "two files: kept as sent"
        );
        assert_eq!(
            redacted.stream_outputs[0].urls,
            ["rtmp://host/app/{str...ey1}", "mux://{abc...ghi}"]
        );
        #[allow(deprecated)]
        let Some(proto::web_egress_request::Output::File(file)) = &redacted.output else {
            panic!("output changed")
        };
        let Some(proto::encoded_file_output::Output::S3(s3)) = &file.output else {
            panic!("output changed")
        };
        assert_eq!(s3.secret, "{secret}");

        let composite = proto::TrackCompositeEgressRequest {
            room_name: "r".into(),
            audio_track_id: "TR_a".into(),
            #[allow(deprecated)]
            output: Some(proto::track_composite_egress_request::Output::Stream(
                stream,
            )),
            ..Default::default()
        };
        let StartRequest::TrackComposite(redacted) =
            redact(&StartRequest::TrackComposite(composite))
        else {
            panic!("kind changed")
        };
        #[allow(deprecated)]
        let Some(proto::track_composite_egress_request::Output::Stream(stream)) = &redacted.output
        else {
            panic!("output changed")
        };
        assert_eq!(stream.urls[0], "rtmp://host/app/{str...ey1}");
    }

    #[test]
    fn track_egress_hides_its_upload_and_websocket_query() {
        let file = proto::TrackEgressRequest {
            room_name: "r".into(),
            track_id: "TR_1".into(),
            output: Some(proto::track_egress_request::Output::File(
                proto::DirectFileOutput {
                    filepath: "f.ogg".into(),
                    output: Some(proto::direct_file_output::Output::S3(s3())),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let StartRequest::Track(redacted) = redact(&StartRequest::Track(file)) else {
            panic!("kind changed")
        };
        let Some(proto::track_egress_request::Output::File(direct)) = &redacted.output else {
            panic!("output changed")
        };
        let Some(proto::direct_file_output::Output::S3(s3)) = &direct.output else {
            panic!("output changed")
        };
        assert_eq!(
            (s3.access_key.as_str(), direct.filepath.as_str()),
            ("{access_key}", "f.ogg")
        );

        let websocket = StartRequest::Track(proto::TrackEgressRequest {
            room_name: "r".into(),
            track_id: "TR_1".into(),
            output: Some(proto::track_egress_request::Output::WebsocketUrl(
                "wss://foo.bar.com/audio?callId=12145&token=7df13dab0d4437602d6f7056b97e72b9"
                    .into(),
            )),
            ..Default::default()
        });
        let StartRequest::Track(redacted) = redact(&websocket) else {
            panic!("kind changed")
        };
        assert_eq!(
            redacted.output,
            Some(proto::track_egress_request::Output::WebsocketUrl(
                "wss://foo.bar.com/audio?callId={...}&token={...}".into()
            ))
        );
    }

    #[test]
    fn requests_without_secrets_are_unchanged_and_the_original_is_left_alone() {
        let plain = StartRequest::parse(EgressKind::RoomComposite, "standup", None).unwrap();
        assert_eq!(redact(&plain), plain);
        let with_secrets = StartRequest::parse(
            EgressKind::Participant,
            "standup",
            Some(json!({
                "identity": "bob",
                "fileOutputs": [{"filepath": "x.mp4", "s3": {"accessKey": "AK", "secret": "S", "bucket": "b"}}],
                "streamOutputs": [{"urls": ["rtmps://live.example.com/app/sk_live_123456"]}],
                "webhooks": [{"url": "https://hooks.example.com", "signingKey": "kept"}]
            })),
        )
        .unwrap();
        let sent = with_secrets.clone();
        let once = redact(&with_secrets);
        assert_eq!(with_secrets, sent, "the request given is not changed");
        assert_ne!(once, with_secrets);
        assert_eq!(
            redact(&with_secrets),
            once,
            "the same request redacts the same way"
        );
        let json = once.to_json();
        assert!(
            json.contains("{access_key}") && json.contains("{sk_...456}"),
            "{json}"
        );
        assert!(
            !json.contains("\"AK\"") && !json.contains("sk_live_123456"),
            "{json}"
        );
        assert!(
            json.contains("kept"),
            "webhook signing keys are not redacted: {json}"
        );
    }
}
