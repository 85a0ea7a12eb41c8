//! Herald connects to a secured NATS: a user and password (in the configuration or the URL), an
//! NKey, a credentials file on a server in operator mode, mutual TLS with a private certificate
//! authority; a refused login or a failed TLS handshake fails the connection at once. Real
//! nats-server processes with `authorization`, `operator` and `tls` configuration blocks.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_nats::{
    Connection, LeaseTable, NatsAuth, NatsError, NatsTls, Publisher, SCHEMA_VERSION, StatusEvent,
    StreamSettings,
};
use herald_tests::nats_server::NatsServer;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects as Herald does, provisions Herald's streams and consumers, takes a partition lease and
/// publishes a command: what `herald serve` needs of NATS.
async fn provisions(url: &str, auth: &NatsAuth, tls: &NatsTls) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = herald_nats::connect(Connection {
        urls: url,
        name: "herald-test",
        auth,
        tls,
    })
    .await?;
    let js = async_nats::jetstream::new(client);
    tokio::time::timeout(
        LOGIN_TIMEOUT,
        herald_nats::provision(&js, &StreamSettings::default()),
    )
    .await
    .context("provisioning timed out")??;
    let leases = LeaseTable::open(&js, "herald-test", Duration::from_secs(5), 1, 8).await?;
    leases.try_acquire(0).await?;
    leases.view().await?;
    let publisher = Publisher::new(js, 8);
    tokio::time::timeout(LOGIN_TIMEOUT, publisher.publish_status(&status_event()))
        .await
        .context("publishing timed out")??;
    Ok(())
}

fn status_event() -> StatusEvent {
    StatusEvent {
        v: SCHEMA_VERSION,
        notification_id: uuid::Uuid::new_v4(),
        status: "sent".into(),
        channel: None,
        error: None,
        at: chrono::Utc::now(),
    }
}

#[tokio::test]
async fn passwords_from_the_configuration_or_the_url_and_nkeys_log_in() -> anyhow::Result<()> {
    let nkey = nkeys::KeyPair::new_user();
    // The password user may use only the subjects the README lists for a restricted user.
    let config = format!(
        r#"authorization {{
            herald_subjects = ["events.>", "notify.>", "herald.>", "$JS.>", "$KV.herald_partitions.>", "_INBOX.>"]
            users = [
                {{ user: herald, password: "p@ss:word", permissions: {{
                    publish: $herald_subjects, subscribe: $herald_subjects }} }}
                {{ nkey: {} }}
            ]
        }}"#,
        nkey.public_key()
    );
    let seed = nkey.seed().context("seed")?;
    let server = NatsServer::start_with_config(&config, &[("herald.nk", &seed)]).await?;
    let url = server.url();
    let tls = NatsTls::default();

    let password = NatsAuth {
        user: Some("herald".into()),
        password: Some("p@ss:word".into()),
        ..NatsAuth::default()
    };
    provisions(&url, &password, &tls)
        .await
        .context("user and password")?;
    let in_url = url.replace("nats://", "nats://herald:p%40ss%3Aword@");
    provisions(&in_url, &NatsAuth::default(), &tls)
        .await
        .context("user and password in the URL")?;
    let seed_file = NatsAuth {
        nkey_seed_file: Some(server.file("herald.nk")),
        ..NatsAuth::default()
    };
    provisions(&url, &seed_file, &tls).await.context("NKey")?;
    Ok(())
}

#[tokio::test]
async fn a_refused_login_fails_the_connection_with_the_server_s_reason() -> anyhow::Result<()> {
    let config = r#"authorization { user: herald, password: right }"#;
    let server = NatsServer::start_with_config(config, &[]).await?;
    let wrong = NatsAuth {
        user: Some("herald".into()),
        password: Some("wrong".into()),
        ..NatsAuth::default()
    };
    let message = refused(
        &server,
        &wrong,
        &NatsTls::default(),
        "the server refused Herald's login",
    )
    .await;
    assert_eq!(
        message,
        "the server refused Herald's login: authorization violation"
    );
    Ok(())
}

/// Connects with `auth` and `tls` to `server`, which refuses them: the connection fails at once
/// with a reason containing `reason`, which is returned. Failing at all means no retrying in the
/// background, which would hand back a client.
async fn refused(server: &NatsServer, auth: &NatsAuth, tls: &NatsTls, reason: &str) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let connection = Connection {
        urls: &server.url(),
        name: "herald-test",
        auth,
        tls,
    };
    match tokio::time::timeout(LOGIN_TIMEOUT, herald_nats::connect(connection)).await {
        Ok(Err(NatsError::Connect(message))) => {
            assert!(
                message.contains(reason),
                "expected {reason:?} in {message:?}"
            );
            message
        }
        Ok(other) => panic!(
            "a refused connection must fail at once with {reason:?}, got {:?}",
            other.map(|_| "a client")
        ),
        Err(_) => panic!("connect did not answer within {LOGIN_TIMEOUT:?}"),
    }
}

/// A certificate authority, a server certificate for 127.0.0.1 and a client certificate, as PEM
/// files (name, contents).
fn certificates() -> anyhow::Result<Vec<(&'static str, String)>> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Herald test CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issue = |names: Vec<String>, common_name: &str| -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = issue(vec!["127.0.0.1".into()], "nats")?;
    let (client_cert, client_key) = issue(Vec::new(), "herald")?;
    Ok(vec![
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server_cert),
        ("server-key.pem", server_key),
        ("client.pem", client_cert),
        ("client-key.pem", client_key),
    ])
}

#[tokio::test]
async fn mutual_tls_with_a_private_authority() -> anyhow::Result<()> {
    let mut files = certificates()?;
    let other_ca = certificates()?.swap_remove(0).1;
    files.push(("other-ca.pem", other_ca));
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let config = r#"tls {
        cert_file: "{dir}/server.pem"
        key_file: "{dir}/server-key.pem"
        ca_file: "{dir}/ca.pem"
        verify: true
    }"#;
    let server = NatsServer::start_with_config(config, &files).await?;
    let file = |name: &str| -> Option<PathBuf> { Some(server.file(name)) };
    let tls = NatsTls {
        required: true,
        ca_file: file("ca.pem"),
        cert_file: file("client.pem"),
        key_file: file("client-key.pem"),
    };
    provisions(&server.url(), &NatsAuth::default(), &tls)
        .await
        .context("mutual TLS")?;

    let without_certificate = NatsTls {
        cert_file: None,
        key_file: None,
        ..tls.clone()
    };
    refused(
        &server,
        &NatsAuth::default(),
        &without_certificate,
        "the TLS handshake with the server failed: received fatal alert: BadCertificate",
    )
    .await;
    let trusting_another_authority = NatsTls {
        ca_file: file("other-ca.pem"),
        ..tls
    };
    refused(
        &server,
        &NatsAuth::default(),
        &trusting_another_authority,
        "the TLS handshake with the server failed: invalid peer certificate",
    )
    .await;
    Ok(())
}

/// A JWT of the NATS decentralised auth model (`alg` `ed25519-nkey`) for `subject`, issued and
/// signed by `issuer`, with `nats` as its NATS-specific claims.
fn nats_jwt(
    issuer: &nkeys::KeyPair,
    subject: &str,
    name: &str,
    nats: serde_json::Value,
) -> anyhow::Result<String> {
    let header = serde_json::json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let claims = serde_json::json!({
        "jti": format!("{subject}{name}").to_uppercase(),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = issuer.sign(signed.as_bytes())?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

#[tokio::test]
async fn a_credentials_file_logs_in_to_a_server_in_operator_mode() -> anyhow::Result<()> {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let system = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "herald-test-operator",
        serde_json::json!({"type": "operator", "version": 2}),
    )?;
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "herald",
        serde_json::json!({"type": "account", "version": 2, "limits": unlimited}),
    )?;
    // JetStream needs a system account for its internal subscriptions.
    let system_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    )?;
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "herald",
        serde_json::json!({
            "type": "user", "version": 2, "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1,
        }),
    )?;
    let config = format!(
        "operator: {operator_jwt}\nsystem_account: {system}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {account}: {account_jwt}\n  {system}: {system_jwt}\n}}\n",
        system = system.public_key(),
        account = account.public_key(),
    );
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed()?
    );
    let server = NatsServer::start_with_config(&config, &[("herald.creds", &creds)]).await?;
    let auth = NatsAuth {
        credentials_file: Some(server.file("herald.creds")),
        ..NatsAuth::default()
    };
    provisions(&server.url(), &auth, &NatsTls::default())
        .await
        .with_context(|| format!("credentials file; server log:\n{}", server.log_tail(20)))?;
    Ok(())
}

/// A server that cannot be reached at the start and then answers with a refusal fails the start
/// (within one of the waits's reports), as one that refuses at once does, instead of being tried
/// again forever; a wait with a limit ends at the limit.
#[tokio::test]
async fn a_server_that_refuses_once_it_answers_fails_the_waiting_start() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = r#"authorization { user: herald, password: right }"#;
    let mut server = NatsServer::start_with_config(config, &[]).await?;
    let url = server.url();
    server.stop().await?;
    let wrong = NatsAuth {
        user: Some("herald".into()),
        password: Some("wrong".into()),
        ..NatsAuth::default()
    };
    let tls = NatsTls::default();
    let limited = herald_nats::connect::connect_within(
        Connection {
            urls: &url,
            name: "herald-test",
            auth: &wrong,
            tls: &tls,
        },
        Duration::from_secs(1),
    )
    .await;
    assert!(
        matches!(&limited, Err(NatsError::Connect(m)) if m.contains("within 1 s")),
        "{:?}",
        limited.map(|_| "a client")
    );
    let waiting = {
        let (url, wrong, tls) = (url.clone(), wrong.clone(), tls.clone());
        tokio::spawn(async move {
            herald_nats::connect(Connection {
                urls: &url,
                name: "herald-test",
                auth: &wrong,
                tls: &tls,
            })
            .await
            .map(|_| "a client")
        })
    };
    server.restart().await?;
    let answer = tokio::time::timeout(herald_nats::connect::STILL_WAITING + LOGIN_TIMEOUT, waiting)
        .await
        .context("the waiting connect did not end")??;
    assert!(
        matches!(&answer, Err(NatsError::Connect(m)) if m.contains("the server refused Herald's login")),
        "{answer:?}"
    );
    Ok(())
}
