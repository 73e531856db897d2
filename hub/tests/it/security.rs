//! Device identity, operator roles, TLS, safe defaults and the operations
//! endpoints, against a real hub. Certificates are made in the test (rcgen).

use std::path::PathBuf;
use std::time::Duration;

use hub::config::{DeviceAuthMode, OperatorRole, OperatorToken};
use telemetry_proto::v1::{
    self as pb, device_gateway_client::DeviceGatewayClient, hub_message::Msg as HubMsg,
    operator_client::OperatorClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::harness::*;

/// The services a hub lists through gRPC server reflection, of version
/// `v1` or `v1alpha` (the same messages in two packages).
macro_rules! reflected_services {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect(concat!("reflection ", stringify!($version), " is served"))
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => list
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }};
}

const ADMIN: &str = "admin-token-0123456789";
const READER: &str = "read-token-0123456789";
const FLEET_KEY: &str = "fleet-key-0123456789abcdef";

fn with_tokens(s: &mut hub::Settings) {
    s.auth.operator_tokens = vec![
        OperatorToken {
            name: "ops".into(),
            token: ADMIN.into(),
            role: OperatorRole::Admin,
        },
        OperatorToken {
            name: "dashboard".into(),
            token: READER.into(),
            role: OperatorRole::Read,
        },
    ];
}

/// An Operator client that presents `token`.
async fn operator_as(
    channel: Channel,
    token: Option<&str>,
) -> OperatorClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
    >,
> {
    let header = token.map(|t| {
        format!("Bearer {t}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .unwrap()
    });
    OperatorClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    })
}

/// Opens a stream with a Hello and returns how it went: Ok(device) after a
/// Welcome, or the status it was refused with.
async fn try_connect(channel: Channel, first: pb::DeviceMessage) -> Result<RawDevice, Code> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let response = DeviceGatewayClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await;
    let mut dev = match response {
        Ok(r) => RawDevice {
            tx: Some(tx),
            inbound: r.into_inner(),
        },
        Err(status) => return Err(status.code()),
    };
    match dev.next().await {
        Ok(Some(HubMsg::Welcome(_))) => Ok(dev),
        Ok(other) => panic!("expected Welcome, got {other:?}"),
        Err(status) => Err(status.code()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_tokens_enrollment_rotation_removal_and_no_impostor_takeover() {
    let hub = spawn_hub_with(|s| {
        s.auth.devices = DeviceAuthMode::Token;
        with_tokens(s);
    })
    .await;
    let mut admin = operator_as(hub.channel().await, Some(ADMIN)).await;
    let token = admin
        .add_device(pb::AddDeviceRequest {
            device_id: "dev-t".into(),
            labels: [("site".to_owned(), "lab".to_owned())]
                .into_iter()
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(token.len(), 64);

    let mut real = try_connect(hub.channel().await, hello_token("dev-t", &token))
        .await
        .expect("the right token is welcome");
    let now = now_ms();
    real.send(batch(vec![reading(1, "t", now, 1.0)])).await;
    real.ack_through(1).await;

    // Wrong token, unknown device, no token: the same answer.
    for (id, presented) in [
        ("dev-t", "wrong"),
        ("nobody", token.as_str()),
        ("dev-t", ""),
    ] {
        let refused = try_connect(hub.channel().await, hello_token(id, presented)).await;
        assert_eq!(
            refused.err(),
            Some(Code::Unauthenticated),
            "{id} with {presented:?}"
        );
    }
    // The impostor did not take the real device's stream over.
    real.send(batch(vec![reading(2, "t", now, 2.0)])).await;
    assert_eq!(real.ack_through(2).await.0, 2, "the real stream goes on");

    // Rotation: the old token stops working, the new one works.
    let rotated = admin
        .rotate_device_token(pb::RotateDeviceTokenRequest {
            device_id: "dev-t".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_ne!(rotated, token);
    // The stream that authenticated with the old token is ended too (it
    // may be a thief's).
    assert_eq!(real.end_code().await, Code::Unauthenticated);
    let old = try_connect(hub.channel().await, hello_token("dev-t", &token)).await;
    assert_eq!(old.err(), Some(Code::Unauthenticated));
    let newer = try_connect(hub.channel().await, hello_token("dev-t", &rotated))
        .await
        .expect("the rotated token works");

    // Removal ends the live stream and refuses the device until re-added.
    let removed = admin
        .remove_device(pb::RemoveDeviceRequest {
            device_id: "dev-t".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(removed.was_online);
    let mut newer = newer;
    assert_eq!(newer.end_code().await, Code::Unauthenticated);
    let refused = try_connect(hub.channel().await, hello_token("dev-t", &rotated)).await;
    assert_eq!(refused.err(), Some(Code::Unauthenticated));
    let listed = admin
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert!(listed.is_empty(), "not listed once removed: {listed:?}");
    let again = admin
        .add_device(pb::AddDeviceRequest {
            device_id: "dev-t".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let (back, welcome) = {
        let mut dev = RawDevice::open(hub.channel().await, hello_token("dev-t", &again)).await;
        match dev.next().await {
            Ok(Some(HubMsg::Welcome(w))) => (dev, w),
            other => panic!("expected Welcome, got {other:?}"),
        }
    };
    assert_eq!(
        welcome.acked_seq, 2,
        "re-added: its mark and readings stayed"
    );
    drop(back);

    // Unknown devices and bad ids are clear errors for the operator.
    let err = admin
        .rotate_device_token(pb::RotateDeviceTokenRequest {
            device_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin
        .add_device(pb::AddDeviceRequest {
            device_id: "bad id".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let stats = admin
        .get_hub_stats(pb::GetHubStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(stats.auth_failures >= 5, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_keys_admit_a_whole_fleet_without_a_per_device_step() {
    let hub = spawn_hub_with(|s| {
        s.auth.devices = DeviceAuthMode::Token;
        s.auth.fleet_keys = [("lab".to_owned(), FLEET_KEY.to_owned())]
            .into_iter()
            .collect();
    })
    .await;
    let fleet = SimFleet::start_with(device_sim::FleetConfig {
        hub: hub.url(),
        devices: 5,
        rate_hz: 20.0,
        id_prefix: "fk-".into(),
        credentials: device_sim::Credentials::FleetKey(FLEET_KEY.into()),
        ..Default::default()
    })
    .await;
    fleet.wait_for_acks(50).await;
    // Another key's token, or another device's, is refused.
    let other_key = device_sim::fleet_token("some-other-key-0123456789", "fk-00099");
    let refused = try_connect(hub.channel().await, hello_token("fk-00099", &other_key)).await;
    assert_eq!(refused.err(), Some(Code::Unauthenticated));
    let borrowed = device_sim::fleet_token(FLEET_KEY, "fk-00001");
    let refused = try_connect(hub.channel().await, hello_token("fk-00002", &borrowed)).await;
    assert_eq!(refused.err(), Some(Code::Unauthenticated));
    let summary = fleet.finish().await;
    assert!(
        summary.all_clean() && summary.sent == summary.acked,
        "{summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_limited_per_address() {
    let hub = spawn_hub_with(|s| {
        s.auth.devices = DeviceAuthMode::Token;
        s.auth.max_failures_per_minute = 3;
        s.auth.fleet_keys = [("lab".to_owned(), FLEET_KEY.to_owned())]
            .into_iter()
            .collect();
    })
    .await;
    for _ in 0..3 {
        let refused = try_connect(hub.channel().await, hello_token("lim-1", "guess")).await;
        assert_eq!(refused.err(), Some(Code::Unauthenticated));
    }
    // Further guesses from this address are cut short...
    let refused = try_connect(hub.channel().await, hello_token("lim-1", "guess")).await;
    assert_eq!(refused.err(), Some(Code::ResourceExhausted));
    // ...but a device with valid credentials behind the same address is
    // never locked out by its neighbour's guessing.
    let right = device_sim::fleet_token(FLEET_KEY, "lim-2");
    let dev = try_connect(hub.channel().await, hello_token("lim-2", &right))
        .await
        .expect("valid credentials get in");
    drop(dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_roles_are_checked_at_the_door() {
    let hub = spawn_hub_with(|s| {
        s.auth.devices = DeviceAuthMode::Token;
        s.auth.fleet_keys = [("lab".to_owned(), FLEET_KEY.to_owned())]
            .into_iter()
            .collect();
        with_tokens(s);
    })
    .await;
    let device_token = device_sim::fleet_token(FLEET_KEY, "op-dev");
    let dev = try_connect(hub.channel().await, hello_token("op-dev", &device_token))
        .await
        .unwrap();
    // No token, a wrong one, or a device's token: UNAUTHENTICATED.
    for presented in [
        None,
        Some("nope-nope-nope-nope"),
        Some(device_token.as_str()),
    ] {
        let mut op = operator_as(hub.channel().await, presented).await;
        let err = op
            .list_devices(pb::ListDevicesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{presented:?}");
    }
    // Read may look, not act.
    let mut reader = operator_as(hub.channel().await, Some(READER)).await;
    let listed = reader
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.devices.len(), 1);
    assert!(
        reader
            .get_hub_stats(pb::GetHubStatsRequest {})
            .await
            .is_ok()
    );
    let denied = reader
        .send_command(pb::SendCommandRequest {
            device_id: "op-dev".into(),
            name: "ping".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    for denied in [
        reader
            .add_device(pb::AddDeviceRequest {
                device_id: "x".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        reader
            .backup(pb::BackupRequest {
                to: "/tmp/x".into(),
            })
            .await
            .map(|_| ()),
    ] {
        assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
    }
    // Admin may.
    let mut admin = operator_as(hub.channel().await, Some(ADMIN)).await;
    assert!(
        admin
            .send_command(pb::SendCommandRequest {
                device_id: "op-dev".into(),
                name: "ping".into(),
                ..Default::default()
            })
            .await
            .is_ok()
    );
    // Health and reflection need no token.
    assert_eq!(
        hub.health("").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let services = reflected_services!(v1, hub.channel().await);
    for name in [
        "telemetry.v1.DeviceGateway",
        "telemetry.v1.Operator",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|s| s == name), "{name} in {services:?}");
    }
    // Older clients (Python's grpcio-reflection, many GUIs) ask v1alpha.
    let services = reflected_services!(v1alpha, hub.channel().await);
    assert!(
        services.iter().any(|s| s == "telemetry.v1.Operator"),
        "{services:?}"
    );
    drop(dev);
}

async fn tls_channel(
    hub: &TestHub,
    ca: Certificate,
    identity: Option<(PathBuf, PathBuf)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(ca);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{}", hub.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// A hub on TLS with a certificate of `pki`'s, devices proving their ids
/// by client certificates of the same CA.
async fn mtls_hub(pki: &Pki) -> TestHub {
    let (server_cert, server_key) = pki.issue("hub", "hub", true);
    let ca_path = pki.ca_path();
    spawn_hub_with(|s| {
        s.server.tls.cert = server_cert;
        s.server.tls.key = server_key;
        s.server.tls.client_ca = ca_path;
        s.auth.devices = DeviceAuthMode::Tls;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mtls_admit_only_the_device_the_certificate_names() {
    let pki = Pki::new("hub test CA");
    let hub = mtls_hub(&pki).await;
    let mine = pki.issue("dev-m", "dev-m", false);
    let other = pki.issue("dev-x", "dev-x", false);

    // The device its certificate names.
    let channel = tls_channel(&hub, pki.ca(), Some(mine.clone()))
        .await
        .unwrap();
    let mut dev = try_connect(channel, hello("dev-m")).await.expect("welcome");
    dev.send(batch(vec![reading(1, "t", now_ms(), 1.0)])).await;
    assert_eq!(dev.ack_through(1).await.0, 1);

    // A certificate for another device id.
    let channel = tls_channel(&hub, pki.ca(), Some(other)).await.unwrap();
    let refused = try_connect(channel, hello("dev-m")).await;
    assert_eq!(refused.err(), Some(Code::Unauthenticated));
    // No client certificate at all.
    let channel = tls_channel(&hub, pki.ca(), None).await.unwrap();
    let refused = try_connect(channel.clone(), hello("dev-m")).await;
    assert_eq!(refused.err(), Some(Code::Unauthenticated));
    // An operator without a certificate still gets in over TLS.
    assert!(
        OperatorClient::new(channel)
            .get_hub_stats(pb::GetHubStatsRequest {})
            .await
            .is_ok()
    );
    // A client that does not trust the hub's CA, and a plain one.
    let strange = Pki::new("another CA");
    let wrong_ca = match tls_channel(&hub, strange.ca(), Some(mine)).await {
        Err(_) => true,
        Ok(channel) => OperatorClient::new(channel)
            .get_hub_stats(pb::GetHubStatsRequest {})
            .await
            .is_err(),
    };
    assert!(wrong_ca, "a client with the wrong CA gets nothing");
    let plain = match Endpoint::from_shared(hub.url()).unwrap().connect().await {
        Err(_) => true,
        Ok(channel) => OperatorClient::new(channel)
            .get_hub_stats(pb::GetHubStatsRequest {})
            .await
            .is_err(),
    };
    assert!(plain, "plain HTTP/2 gets nothing from a TLS hub");
    drop(dev);
}

/// A certificate names its device in one configured place (the CN by
/// default), so one that also lists other ids in its SANs is not theirs;
/// pins bind a device to one certificate, and a revoked certificate stays
/// refused after its device is removed and added again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_one_device_and_can_be_pinned_and_revoked() {
    use rcgen::SanType;
    let pki = Pki::new("hub test CA");
    let hub = mtls_hub(&pki).await;
    let connect = async |cert: &(PathBuf, PathBuf), id: &str| {
        let channel = tls_channel(&hub, pki.ca(), Some(cert.clone()))
            .await
            .unwrap();
        try_connect(channel, hello(id)).await
    };
    let broad = pki.issue_with(
        "broad",
        "dev-a",
        vec![
            SanType::DnsName("dev-b".try_into().unwrap()),
            SanType::URI("dev-c".try_into().unwrap()),
            SanType::Rfc822Name("dev-d".try_into().unwrap()),
        ],
    );
    assert!(connect(&broad, "dev-a").await.is_ok(), "its CN");
    for other in ["dev-b", "dev-c", "dev-d"] {
        assert_eq!(
            connect(&broad, other).await.err(),
            Some(Code::Unauthenticated),
            "{other} is only in a SAN"
        );
    }

    // Revoked: its stream ends, and removing and re-adding the device does
    // not bring it back; a new certificate does.
    let leaked = pki.issue("leaked", "dev-r", false);
    let mut on_leaked = connect(&leaked, "dev-r").await.expect("welcome");
    let sha256 = hex::encode(hub::auth::certificate_sha256(&pem_der(&leaked.0)));
    let mut admin = OperatorClient::new(tls_channel(&hub, pki.ca(), None).await.unwrap());
    let revoked = admin
        .revoke_certificate(pb::RevokeCertificateRequest {
            sha256: sha256.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((revoked.newly_revoked, revoked.streams_ended), (true, 1));
    assert_eq!(on_leaked.end_code().await, Code::Unauthenticated);
    assert_eq!(
        connect(&leaked, "dev-r").await.err(),
        Some(Code::Unauthenticated)
    );
    admin
        .remove_device(pb::RemoveDeviceRequest {
            device_id: "dev-r".into(),
        })
        .await
        .unwrap();
    admin
        .add_device(pb::AddDeviceRequest {
            device_id: "dev-r".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        connect(&leaked, "dev-r").await.err(),
        Some(Code::Unauthenticated),
        "still revoked after remove and add"
    );
    let renewed = pki.issue("renewed", "dev-r", false);
    assert!(connect(&renewed, "dev-r").await.is_ok());

    // Pinned through the CLI, by the certificate's file: another
    // certificate for the same id is refused until the pin is lifted.
    let first = pki.issue("first", "dev-p", false);
    let second = pki.issue("second", "dev-p", false);
    assert!(connect(&second, "dev-p").await.is_ok());
    let ca = pki.ca_path().display().to_string();
    let url = format!("https://{}", hub.addr);
    let cert = first.0.display().to_string();
    let hub::cli::Command::Devices(args) = crate::cli::parse(&[
        "hub", "devices", "pin-cert", "--hub", &url, "--ca", &ca, "dev-p", "--pem", &cert,
    ]) else {
        panic!("devices args")
    };
    let mut out = Vec::new();
    hub::cli::device_action(args.action.as_ref().unwrap(), &mut out)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("pinned dev-p to "));
    assert_eq!(
        connect(&second, "dev-p").await.err(),
        Some(Code::Unauthenticated)
    );
    assert!(connect(&first, "dev-p").await.is_ok());
    admin
        .pin_device_certificate(pb::PinDeviceCertificateRequest {
            device_id: "dev-p".into(),
            sha256: String::new(),
        })
        .await
        .unwrap();
    assert!(connect(&second, "dev-p").await.is_ok(), "unpinned");
    let unknown = admin
        .pin_device_certificate(pb::PinDeviceCertificateRequest {
            device_id: "nobody".into(),
            sha256: sha256.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let bad = admin
        .revoke_certificate(pb::RevokeCertificateRequest {
            sha256: "xyz".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

/// `hub certs` writes a set that works: a TLS hub on its hub certificate
/// admits a simulated device on its device certificate; run again, it
/// reuses the CA for a new device. A TLS failure is told as one, with what
/// to do, however tonic wraps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_certs_writes_a_working_set_and_tls_failures_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("certs");
    let out = out_dir.display().to_string();
    let certs = |device: &str| {
        let hub::cli::Command::Certs(args) =
            crate::cli::parse(&["hub", "certs", "--out", &out, "--device", device])
        else {
            panic!("certs args")
        };
        let mut printed = Vec::new();
        hub::cli::certs::run(&args, &mut printed).unwrap();
        String::from_utf8(printed).unwrap()
    };
    let first = certs("cert-00001");
    assert!(first.contains("devices = \"tls\""), "{first}");
    let file = |name: &str| out_dir.join(name);
    let hub = spawn_hub_with(|s| {
        s.server.tls.cert = file("hub.pem");
        s.server.tls.key = file("hub.key");
        s.server.tls.client_ca = file("ca.pem");
        s.auth.devices = DeviceAuthMode::Tls;
    })
    .await;
    let device = |prefix: &str, start_index| device_sim::FleetConfig {
        hub: format!("https://{}", hub.addr),
        devices: 1,
        id_prefix: prefix.into(),
        start_index,
        tls: Some(device_sim::TlsFiles {
            ca: file("ca.pem"),
            identity: Some((
                file(&format!("{prefix}{start_index:05}.pem")),
                file(&format!("{prefix}{start_index:05}.key")),
            )),
        }),
        ..Default::default()
    };
    let fleet = SimFleet::start_with(device("cert-", 1)).await;
    fleet.wait_for_acks(10).await;
    let again = certs("cert-00002");
    assert!(again.contains("reused"), "{again}");
    assert!(again.contains("kept"), "{again}");
    let second = SimFleet::start_with(device("cert-", 2)).await;
    second.wait_for_acks(10).await;
    for f in [fleet, second] {
        let summary = f.finish().await;
        assert!(summary.all_clean(), "{summary:?}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the CA's key is private");

    // A client trusting another CA: the failure is a TLS one, and says so.
    let strange = Pki::new("another CA");
    let channel = Endpoint::from_shared(format!("https://{}", hub.addr))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(strange.ca()))
        .unwrap()
        .connect_lazy();
    let status = OperatorClient::new(channel)
        .get_hub_stats(pb::GetHubStatsRequest {})
        .await
        .unwrap_err();
    let why = device_sim::tls::failure(&status).expect("a TLS failure");
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    // A plain connection refused is not one.
    // Reserved and never listened on: the connection is refused.
    let reserved = reserve_port();
    let port = reserved.port;
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    let status = OperatorClient::new(channel)
        .get_hub_stats(pb::GetHubStatsRequest {})
        .await
        .unwrap_err();
    assert_eq!(device_sim::tls::failure(&status), None, "{status:?}");
}

/// The DER of the first certificate in a PEM file.
pub(crate) fn pem_der(path: &std::path::Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap();
    let text = String::from_utf8(pem).unwrap();
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_on_devices_and_on_a_device_reading_rate() {
    let hub = spawn_hub_with(|s| {
        s.server.max_devices = 2;
        s.server.max_readings_per_sec = 1000;
    })
    .await;
    let (mut a, _) = RawDevice::connect(&hub, "lim-a").await;
    let (_b, _) = RawDevice::connect(&hub, "lim-b").await;
    let refused = try_connect(hub.channel().await, hello("lim-c")).await;
    assert_eq!(refused.err(), Some(Code::ResourceExhausted));
    // A takeover of a connected device is not a new one.
    let (mut a2, _) = RawDevice::connect(&hub, "lim-a").await;
    assert_eq!(a.end_code().await, Code::Aborted);
    // 3000 readings at 1000/s (a burst of 1000): paced, none rejected.
    let now = now_ms();
    let started = std::time::Instant::now();
    for start in (1..=3000u64).step_by(500) {
        a2.send(batch(
            (start..start + 500)
                .map(|s| reading(s, "t", now, s as f64))
                .collect(),
        ))
        .await;
    }
    let (acked, rejected, _) = a2.ack_through(3000).await;
    assert_eq!((acked, rejected), (3000, 0));
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "paced to the rate: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_list_in_pages() {
    let hub = spawn_hub().await;
    for i in 0..25 {
        hub.register_offline(&format!("page-{i:02}")).await;
    }
    let mut op = hub.operator().await;
    let mut seen = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let page = op
            .list_devices(pb::ListDevicesRequest {
                after,
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.devices.into_iter().map(|d| d.device_id));
        if page.next_after.is_empty() {
            break;
        }
        after = page.next_after;
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        (0..25).map(|i| format!("page-{i:02}")).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_backup_while_ingest_runs_is_consistent_and_opens() {
    let hub = spawn_hub_with(|s| s.storage.compact_rows = 500).await;
    let fleet = SimFleet::start_with(device_sim::FleetConfig {
        hub: hub.url(),
        devices: 4,
        rate_hz: 200.0,
        id_prefix: "bk-".into(),
        ..Default::default()
    })
    .await;
    fleet.wait_for_acks(1_000).await;
    // Only a plain name, below the hub's backup directory.
    for bad in [
        "",
        "../escape",
        "/tmp/abs",
        "file:/tmp/x?y=",
        ".hidden",
        "a/b",
    ] {
        let err = hub
            .operator()
            .await
            .backup(pb::BackupRequest { to: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
    }
    if on_postgres() {
        // PostgreSQL is backed up with pg_dump: the hub says so.
        let refused = hub
            .operator()
            .await
            .backup(pb::BackupRequest { to: "copy".into() })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(refused.message().contains("pg_dump"), "{refused:?}");
        fleet.finish().await;
        return;
    }
    let report = hub
        .operator()
        .await
        .backup(pb::BackupRequest { to: "copy".into() })
        .await
        .unwrap()
        .into_inner();
    let readings_copy = PathBuf::from(&report.readings_path);
    let to = readings_copy.parent().unwrap().to_owned();
    assert_eq!(to, hub.db_path().with_file_name("backups").join("copy"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&to).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "only the hub's user may read a backup");
    }
    assert_eq!(report.devices, 4);
    assert!(report.readings >= 1_000, "{report:?}");
    // Into the same place again: refused, nothing overwritten.
    let again = hub
        .operator()
        .await
        .backup(pb::BackupRequest { to: "copy".into() })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    fleet.finish().await;
    // The copy is a working hub database: every device's seqs are 1..=n
    // with n its mark, as of the moment of the copy.
    assert_eq!(integrity_check(&to.join("hub.db")).await, "ok");
    let restored_db = TestDb::new().await;
    let restored_dir = restored_db.path();
    std::fs::copy(to.join("hub.db"), restored_dir.join("hub.db")).unwrap();
    std::fs::copy(
        to.join("hub-commands.db"),
        restored_dir.join("hub-commands.db"),
    )
    .unwrap();
    let mut restored = spawn_hub_in(restored_db, |_| {}).await;
    let mut total = 0;
    for i in 1..=4 {
        let id = device_sim::device_id("bk-", i);
        let info = restored.device(&id).await.unwrap();
        let seqs: Vec<u64> = restored.readings(&id).await.iter().map(|r| r.seq).collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=info.acked_seq).collect::<Vec<_>>(), "{id}");
        total += seqs.len() as u64;
    }
    assert_eq!(total, report.readings);
    restored.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_defaults_refuse_open_doors_on_a_network_address_and_secrets_stay_masked() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = crate::harness::hub_process()
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.db").display().to_string();
    let (code, _, err) = run(
        &["serve"],
        &[
            ("HUB__SERVER__LISTEN", "0.0.0.0:0"),
            ("HUB__STORAGE__PATH", &db),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("auth.devices") && err.contains("allow_open"),
        "{err}"
    );
    let (code, _, err) = run(
        &["print-config"],
        &[
            ("HUB__SERVER__LISTEN", "0.0.0.0:0"),
            ("HUB__AUTH__DEVICES", "token"),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("auth.operator_tokens"), "{err}");

    // Secrets from a config file never print.
    let file = dir.path().join("hub.toml");
    std::fs::write(
        &file,
        format!(
            "[auth]\ndevices = \"token\"\n[auth.fleet_keys]\nlab = \"{FLEET_KEY}\"\n\
             [[auth.operator_tokens]]\nname = \"ops\"\ntoken = \"{ADMIN}\"\nrole = \"admin\"\n"
        ),
    )
    .unwrap();
    let (code, out, err) = run(&["print-config", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(FLEET_KEY) && !out.contains(ADMIN), "{out}");
    assert!(
        out.contains("[[auth.operator_tokens]]") && out.contains("********"),
        "{out}"
    );
    // Nor from an error about them: a token written where a table belongs.
    let (code, _, err) = run(&["print-config"], &[("HUB__AUTH__OPERATOR_TOKENS", ADMIN)]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("auth.operator_tokens") && !err.contains(ADMIN),
        "{err}"
    );
    // With tokens, a network address needs TLS (or a knowing opt-out for
    // a TLS-terminating proxy): tokens must not cross the network in clear.
    let (code, _, err) = run(
        &["print-config", "--config", file.to_str().unwrap()],
        &[("HUB__SERVER__LISTEN", "0.0.0.0:0")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("server.tls.cert") && err.contains("in clear"),
        "{err}"
    );
    let (code, _, err) = run(
        &["print-config", "--config", file.to_str().unwrap()],
        &[
            ("HUB__SERVER__LISTEN", "0.0.0.0:0"),
            ("HUB__AUTH__ALLOW_PLAINTEXT", "true"),
        ],
    );
    assert_eq!(code, 0, "{err}");
}

/// Runs the real `hub` binary with `env`; (exit code, stdout, stderr).
fn hub_bin(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = crate::harness::hub_process()
        .args(args)
        .env_remove("HUB_ADDR")
        .env_remove("HUB_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_devices_and_backups_over_tls_with_a_token() {
    let pki = Pki::new("cli CA");
    let (server_cert, server_key) = pki.issue("hub", "hub", true);
    let hub = spawn_hub_with(|s| {
        s.server.tls.cert = server_cert;
        s.server.tls.key = server_key;
        s.auth.devices = DeviceAuthMode::Token;
        with_tokens(s);
    })
    .await;
    let url = format!("https://{}", hub.addr);
    let ca = pki.ca_path().display().to_string();
    let admin = [("HUB_TOKEN", ADMIN)];
    let (code, out, err) = hub_bin(
        &[
            "devices",
            "add",
            "cli-tls-00001",
            "--label",
            "site=lab",
            "--hub",
            &url,
            "--ca",
            &ca,
            "--format",
            "json",
        ],
        &admin,
    );
    assert_eq!(code, 0, "{err}");
    let added: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let token = added["token"].as_str().unwrap().to_owned();

    // A device with that token, over TLS, through device-sim.
    let fleet = SimFleet::start_with(device_sim::FleetConfig {
        hub: url.clone(),
        devices: 1,
        rate_hz: 50.0,
        id_prefix: "cli-tls-".into(),
        // Removed at the end, it cannot drain: do not wait long for it.
        drain_timeout: Duration::from_secs(1),
        credentials: device_sim::Credentials::Token(token.clone()),
        tls: Some(device_sim::TlsFiles {
            ca: pki.ca_path(),
            identity: None,
        }),
        ..Default::default()
    })
    .await;
    fleet.wait_for_acks(20).await;

    // Read may list, not add; without --ca an https hub is refused clearly.
    let (code, out, err) = hub_bin(
        &["devices", "--hub", &url, "--ca", &ca, "--format", "json"],
        &[("HUB_TOKEN", READER)],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"device_id\":\"cli-tls-00001\""), "{out}");
    let (code, _, err) = hub_bin(
        &["devices", "add", "x", "--hub", &url, "--ca", &ca],
        &[("HUB_TOKEN", READER)],
    );
    assert_eq!(code, 1);
    assert!(err.contains("may not call AddDevice"), "{err}");
    let (code, _, err) = hub_bin(&["stats", "--hub", &url], &admin);
    assert_eq!(code, 1);
    assert!(err.contains("--ca"), "{err}");

    let (code, out, err) = hub_bin(
        &["backup", "--to", "b1", "--hub", &url, "--ca", &ca],
        &admin,
    );
    if on_postgres() {
        assert_eq!(code, 1, "{out}");
        assert!(err.contains("pg_dump"), "{err}");
    } else {
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("backup verified:"), "{out}");
    }

    let (code, out, err) = hub_bin(
        &[
            "devices",
            "rotate-token",
            "cli-tls-00001",
            "--hub",
            &url,
            "--ca",
            &ca,
        ],
        &admin,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("shown once"), "{out}");
    // Its stream, on the old token, was ended; it cannot come back.
    wait_until("the device off", || async {
        hub.hub().metrics().live_sessions() == 0
    })
    .await;
    let (code, out, err) = hub_bin(
        &[
            "devices",
            "remove",
            "cli-tls-00001",
            "--hub",
            &url,
            "--ca",
            &ca,
        ],
        &admin,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "removed cli-tls-00001");
    let summary = fleet.finish().await;
    assert_eq!((summary.lost_acks, summary.bad_acks), (0, 0), "{summary:?}");
    assert_eq!(
        summary.clean_devices, 0,
        "removed, it could not close cleanly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n\
             [auth]\ndevices = \"token\"\n[auth.fleet_keys]\nlab = \"{FLEET_KEY}\"\n\
             [[auth.operator_tokens]]\nname = \"ops\"\ntoken = \"{ADMIN}\"\nrole = \"admin\"\n\
             [mqtt]\npassword = \"mqtt-secret-0123456789\"\n",
            dir.path().join("hub.db").display()
        ),
    )
    .unwrap();
    let mut child = crate::harness::hub_process()
        .args(["serve", "--config", file.to_str().unwrap()])
        .env("RUST_LOG", "debug")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let addr = loop {
        let line = tokio::time::timeout(WAIT, lines.recv())
            .await
            .unwrap()
            .unwrap();
        log.push(line.clone());
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // A wrong token, a right one, and an admin action by name.
    let refused = try_connect(channel.clone(), hello_token("sec-1", ADMIN)).await;
    assert_eq!(refused.err(), Some(Code::Unauthenticated));
    let good = device_sim::fleet_token(FLEET_KEY, "sec-2");
    let dev = try_connect(channel.clone(), hello_token("sec-2", &good))
        .await
        .unwrap();
    let mut admin = operator_as(channel, Some(ADMIN)).await;
    admin
        .add_device(pb::AddDeviceRequest {
            device_id: "sec-3".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(dev);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(5), lines.recv()).await {
        log.push(line);
    }
    let text = log.join("\n");
    assert!(
        text.lines()
            .any(|l| l.contains("device added") && l.contains("by=\"ops\"")),
        "admin actions are logged with the token's name:\n{text}"
    );
    for secret in [FLEET_KEY, ADMIN, good.as_str(), "mqtt-secret-0123456789"] {
        assert!(
            !text.contains(secret),
            "{secret} appears in the log:\n{text}"
        );
    }
}
