//! TLS and mutual TLS on the KEDA gRPC listener, with certificates made in the test: real
//! tonic TLS clients call the scaler, a client without a certificate is refused when a client
//! CA is set, and rewritten certificate files reach new connections without a restart.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egress_scaler::scaler::proto::GetMetricSpecResponse;
use egress_scaler::scaler::proto::external_scaler_client::ExternalScalerClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA that signs a server certificate for `localhost` and a client certificate.
struct Pki {
    ca_pem: String,
    server_pem: String,
    server_key_pem: String,
    server_der: CertificateDer<'static>,
    client_pem: String,
    client_key_pem: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = server_params.signed_by(&server_key, &ca).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(vec!["keda".to_owned()]).unwrap();
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params.signed_by(&client_key, &ca).unwrap();

        Pki {
            ca_pem: ca.pem(),
            server_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
            server_der: server.der().clone(),
            client_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }

    /// Writes the server's files as cert-manager would mount them.
    fn write_server_files(&self, dir: &Path) {
        write_atomically(&dir.join("tls.crt"), &self.server_pem);
        write_atomically(&dir.join("tls.key"), &self.server_key_pem);
        write_atomically(&dir.join("ca.crt"), &self.ca_pem);
    }
}

/// Writes through a rename, so the server never reads half a file.
fn write_atomically(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "egress-scaler-tls-{name}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

async fn tls_client(
    server: &support::TestServer,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<ExternalScalerClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{}", server.grpc_addr))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(ExternalScalerClient::new(channel))
}

async fn metric_spec(
    client: &mut ExternalScalerClient<Channel>,
) -> Result<GetMetricSpecResponse, tonic::Status> {
    client
        .get_metric_spec(support::scaled_object(&[("queue", "rec")]))
        .await
        .map(|response| response.into_inner())
}

async fn start(
    redis: &egress_scaler::redis_server::RedisServer,
    flags: &[&str],
) -> support::TestServer {
    // The queue the tests' trigger names must be one the server serves.
    let flags: Vec<&str> = flags.iter().copied().chain(["--queue", "rec"]).collect();
    let mut config = support::config(redis, &flags, &support::NoEnvironment);
    // Fast polling keeps the reload test short; the default is a few seconds.
    if let Some(tls) = config.grpc_tls.as_mut() {
        tls.reload_interval = Duration::from_millis(100);
    }
    support::TestServer::start(config).await
}

#[tokio::test]
async fn tls_clients_reach_the_scaler_and_plaintext_ones_do_not() {
    let redis = support::redis();
    let pki = Pki::new("tls");
    let dir = TempDir::new("plain");
    pki.write_server_files(&dir.0);
    let server = start(
        &redis,
        &[
            "--tls-cert",
            &dir.path("tls.crt"),
            "--tls-key",
            &dir.path("tls.key"),
        ],
    )
    .await;

    let mut client = tls_client(&server, &pki.ca_pem, None)
        .await
        .expect("TLS connects");
    let spec = metric_spec(&mut client)
        .await
        .expect("GetMetricSpec answers");
    assert_eq!(spec.metric_specs[0].metric_name, "egress-replicas-rec");

    // A client trusting another CA refuses the server.
    let stranger = Pki::new("stranger");
    assert!(tls_client(&server, &stranger.ca_pem, None).await.is_err());

    // A plaintext client gets no answer from a TLS listener.
    let plaintext = async {
        let mut client =
            ExternalScalerClient::connect(format!("http://{}", server.grpc_addr)).await?;
        metric_spec(&mut client).await.map_err(Into::into)
    };
    let result: Result<_, Box<dyn std::error::Error>> =
        tokio::time::timeout(Duration::from_secs(10), plaintext)
            .await
            .expect("the plaintext attempt ends");
    assert!(result.is_err(), "{result:?}");

    server.stop().await;
}

#[tokio::test]
async fn a_client_ca_requires_client_certificates() {
    let redis = support::redis();
    let pki = Pki::new("mtls");
    let dir = TempDir::new("mtls");
    pki.write_server_files(&dir.0);
    let server = start(
        &redis,
        &[
            "--tls-cert",
            &dir.path("tls.crt"),
            "--tls-key",
            &dir.path("tls.key"),
            "--tls-client-ca",
            &dir.path("ca.crt"),
        ],
    )
    .await;

    let mut client = tls_client(
        &server,
        &pki.ca_pem,
        Some((&pki.client_pem, &pki.client_key_pem)),
    )
    .await
    .expect("mTLS connects");
    metric_spec(&mut client)
        .await
        .expect("a client with a certificate is served");

    // Without a certificate: with TLS 1.3 the handshake may complete on the client's side
    // before the server refuses it, so the refusal shows either at connect or on the call.
    let refused = match tls_client(&server, &pki.ca_pem, None).await {
        Err(_) => true,
        Ok(mut client) => metric_spec(&mut client).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    // A certificate from another CA is refused as well.
    let stranger = Pki::new("stranger");
    let refused = match tls_client(
        &server,
        &pki.ca_pem,
        Some((&stranger.client_pem, &stranger.client_key_pem)),
    )
    .await
    {
        Err(_) => true,
        Ok(mut client) => metric_spec(&mut client).await.is_err(),
    };
    assert!(refused, "a client certificate from another CA was served");

    // The server keeps serving good clients after refusing bad ones.
    let mut client = tls_client(
        &server,
        &pki.ca_pem,
        Some((&pki.client_pem, &pki.client_key_pem)),
    )
    .await
    .expect("mTLS connects again");
    metric_spec(&mut client).await.expect("still served");

    server.stop().await;
}

/// The leaf certificate a new TLS connection is served, trusting any of `ca_pems`.
async fn served_certificate(
    server: &support::TestServer,
    ca_pems: &[&str],
) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for pem in ca_pems {
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .unwrap();
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake with a trusted certificate");
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test]
async fn rewritten_certificate_files_reach_new_connections() {
    support::init();
    let redis = support::redis();
    let first = Pki::new("first");
    let dir = TempDir::new("reload");
    first.write_server_files(&dir.0);
    let server = start(
        &redis,
        &[
            "--tls-cert",
            &dir.path("tls.crt"),
            "--tls-key",
            &dir.path("tls.key"),
            "--tls-client-ca",
            &dir.path("ca.crt"),
        ],
    )
    .await;
    let both = [first.ca_pem.as_str()];
    assert_eq!(served_certificate(&server, &both).await, first.server_der);
    // An open channel made with the first certificate.
    let mut old_client = tls_client(
        &server,
        &first.ca_pem,
        Some((&first.client_pem, &first.client_key_pem)),
    )
    .await
    .unwrap();
    metric_spec(&mut old_client).await.unwrap();

    // A half-written rotation (a key that does not match the certificate) is not taken.
    let second = Pki::new("second");
    write_atomically(&dir.0.join("tls.crt"), &second.server_pem);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(served_certificate(&server, &both).await, first.server_der);

    // The rotation completes: new connections get the new certificate.
    second.write_server_files(&dir.0);
    let both = [first.ca_pem.as_str(), second.ca_pem.as_str()];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if served_certificate(&server, &both).await == second.server_der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The new client CA is in force too: the new client is served, the old one refused.
    let mut client = tls_client(
        &server,
        &second.ca_pem,
        Some((&second.client_pem, &second.client_key_pem)),
    )
    .await
    .expect("the rotated server accepts the new client");
    metric_spec(&mut client)
        .await
        .expect("served after the rotation");
    let refused = match tls_client(
        &server,
        &second.ca_pem,
        Some((&first.client_pem, &first.client_key_pem)),
    )
    .await
    {
        Err(_) => true,
        Ok(mut client) => metric_spec(&mut client).await.is_err(),
    };
    assert!(
        refused,
        "a client certificate of the old CA was served after the rotation"
    );
    // The connection made before the rotation keeps working.
    metric_spec(&mut old_client)
        .await
        .expect("open connections survive a rotation");

    server.stop().await;
}

#[test]
fn a_bad_tls_file_stops_serve_with_one_line_naming_its_flag() {
    let pki = Pki::new("binary");
    let dir = TempDir::new("binary");
    pki.write_server_files(&dir.0);
    std::fs::write(dir.0.join("garbage.pem"), "not a key").unwrap();
    let other = Pki::new("other");
    std::fs::write(dir.0.join("other.key"), &other.server_key_pem).unwrap();
    let cases: [(Vec<String>, &str); 4] = [
        (
            vec![
                "--tls-cert".into(),
                dir.path("missing.crt"),
                "--tls-key".into(),
                dir.path("tls.key"),
            ],
            "--tls-cert",
        ),
        (
            vec![
                "--tls-cert".into(),
                dir.path("tls.crt"),
                "--tls-key".into(),
                dir.path("garbage.pem"),
            ],
            "--tls-key",
        ),
        (
            // A key that is not the certificate's.
            vec![
                "--tls-cert".into(),
                dir.path("tls.crt"),
                "--tls-key".into(),
                dir.path("other.key"),
            ],
            "--tls-key",
        ),
        (
            vec![
                "--tls-cert".into(),
                dir.path("tls.crt"),
                "--tls-key".into(),
                dir.path("tls.key"),
                "--tls-client-ca".into(),
                dir.path("garbage.pem"),
            ],
            "--tls-client-ca",
        ),
    ];
    for (args, flag) in cases {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_egress-scaler"))
            .arg("serve")
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(&args)
            .env_remove("LIVEKIT_API_KEY")
            .env_remove("LIVEKIT_API_SECRET")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("invalid setting {flag}:")),
            "{args:?}: {stderr}"
        );
    }
}
