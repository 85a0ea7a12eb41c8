//! `herald send`: one notification from the command line, through a running Herald's REST API
//! (`POST /api/v1/notifications`), optionally waiting for its outcome
//! (`GET /api/v1/notifications/{id}`). Going through the API keeps every check, idempotency and
//! the stored status exactly as for any other client: this module only turns flags into the
//! request body and the answers into output and an exit code.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use herald_entities::NotificationStatus;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use uuid::Uuid;

use crate::Config;

/// How often `--wait` asks for the notification's status.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Exit code: accepted, but it ended without being sent (`failed`, `skipped`, `cancelled`,
/// `dead`).
pub const EXIT_NOT_SENT: u8 = 3;
/// Exit code: `--wait` ran out before the notification reached a final status.
pub const EXIT_TIMED_OUT: u8 = 4;
/// Exit code: accepted, but `--wait` could not read its status (the key lacks the `read` scope,
/// or Herald stayed unreachable until the wait ended). Sending again would send it twice.
pub const EXIT_STATUS_UNKNOWN: u8 = 5;

/// `herald send`: the flags mirror the API's send request (`docs/api.md`).
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Herald's base URL; derived from `http.bind` when absent (`0.0.0.0:8080` →
    /// `http://127.0.0.1:8080`).
    #[arg(long)]
    pub url: Option<String>,
    /// API key with the `send` scope (and `read` for `--wait`); make one with `herald apikey
    /// create --name cli --scopes send,read`.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub key: String,
    /// Recipient: a stored customer's external id.
    #[arg(long)]
    pub customer_id: Option<String>,
    /// Recipient: email address.
    #[arg(long)]
    pub email: Option<String>,
    /// Recipient: phone number in E.164 form.
    #[arg(long)]
    pub phone: Option<String>,
    /// Recipient: Telegram chat id.
    #[arg(long)]
    pub telegram_chat_id: Option<String>,
    /// Recipient: a push device token (repeatable).
    #[arg(long = "push-token")]
    pub push_tokens: Vec<String>,
    /// Recipient: URL for a signed webhook.
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Category: transactional, security, account or marketing (required, as by the API: it
    /// decides the customer's opt-outs and limits).
    #[arg(long)]
    pub category: String,
    /// A channel to try (repeatable, in chain order): email, telegram, sms, push, webhook; the
    /// category's default chain when absent.
    #[arg(long = "channel")]
    pub channels: Vec<String>,
    /// Subject (email) or title (push).
    #[arg(long)]
    pub subject: Option<String>,
    /// Plain-text body.
    #[arg(long)]
    pub text: Option<String>,
    /// HTML body for email.
    #[arg(long)]
    pub html: Option<String>,
    /// Short text for SMS, Telegram and push.
    #[arg(long)]
    pub short: Option<String>,
    /// A template's code, rendered at delivery instead of literal content.
    #[arg(long, conflicts_with_all = ["subject", "text", "html", "short"])]
    pub template: Option<String>,
    /// A template variable, `name=value` (repeatable); a value that parses as JSON is sent as
    /// that JSON (`n=3`, `items=[1,2]`), any other as a string.
    #[arg(long = "var", value_name = "NAME=VALUE", requires = "template", value_parser = parse_var)]
    pub vars: Vec<(String, Value)>,
    /// Locale to render the template in.
    #[arg(long, requires = "template")]
    pub locale: Option<String>,
    /// Idempotency key: repeating it sends nothing new and answers the first notification. A
    /// new UUID when absent, printed on stderr if the send fails, for a retry that cannot send
    /// twice.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Send at this time (RFC 3339) instead of now.
    #[arg(long)]
    pub scheduled_at: Option<String>,
    /// Wait up to SECS (60 when given alone) for a final status and print the notification
    /// with its attempts instead of the acceptance.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "60")]
    pub wait: Option<u64>,
}

/// Sends the notification `args` describes and prints the API's answer (or, with `--wait`, the
/// notification's final state) as one line of JSON on stdout. An API refusal is an error
/// (exit 1) carrying its status and body; see [`EXIT_NOT_SENT`], [`EXIT_TIMED_OUT`] and
/// [`EXIT_STATUS_UNKNOWN`].
pub async fn run(args: SendArgs, config: &Config) -> anyhow::Result<ExitCode> {
    crate::app::install_crypto_provider();
    let base = match &args.url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => url_from_bind(&config.http.bind)?,
    };
    let client = client(&args.key)?;
    let request_id = request_id(&args);
    let accepted = match post(&client, &base, &request_body(&args, &request_id)).await {
        Ok(accepted) => accepted,
        Err(Failed::Passing(err)) => {
            eprintln!("{}", retry_hint(&request_id));
            return Err(err);
        }
        Err(Failed::Refused(err)) => return Err(err),
    };
    let Some(secs) = args.wait else {
        println!("{accepted}");
        return Ok(ExitCode::SUCCESS);
    };
    let id = accepted["id"]
        .as_str()
        .context("the API's answer has no notification id")?;
    let (view, status) = match wait_final(&client, &base, id, Duration::from_secs(secs)).await {
        Ok(read) => read,
        Err(err) => {
            // Accepted all the same: the acceptance on stdout, as without `--wait`.
            println!("{accepted}");
            eprintln!("notification {id} was accepted; cannot read its status: {err:#}");
            return Ok(ExitCode::from(EXIT_STATUS_UNKNOWN));
        }
    };
    println!("{view}");
    let status_name = status.as_str();
    if status.is_sent() {
        Ok(ExitCode::SUCCESS)
    } else if status.is_final() {
        eprintln!("notification {id} ended {status_name}, not sent");
        Ok(ExitCode::from(EXIT_NOT_SENT))
    } else {
        eprintln!("notification {id} still {status_name} after {secs} s");
        Ok(ExitCode::from(EXIT_TIMED_OUT))
    }
}

/// The base URL of the Herald listening on `bind`: an unspecified address (`0.0.0.0`, `::`)
/// reached over loopback. Port 0 (a free port picked at start) cannot be guessed.
pub fn url_from_bind(bind: &str) -> anyhow::Result<String> {
    let Ok(mut addr) = bind.parse::<SocketAddr>() else {
        // A host name (`localhost:8080`) is reachable as it is written.
        return Ok(format!("http://{bind}"));
    };
    if addr.port() == 0 {
        bail!("http.bind {bind:?} has port 0, picked anew at each start: give --url");
    }
    if addr.ip().is_unspecified() {
        let loopback = match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        addr.set_ip(loopback);
    }
    Ok(format!("http://{addr}"))
}

/// `name=value` of `--var`: the value as JSON when it parses, else as a string.
pub fn parse_var(raw: &str) -> Result<(String, Value), String> {
    let (name, value) = raw
        .split_once('=')
        .ok_or_else(|| format!("{raw:?} is not name=value"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
    Ok((name.to_string(), value))
}

/// The send's request id: `--request-id`, else a new UUID. Always one: without it, a retry of a
/// send whose answer was lost (a timeout, a reset connection, a 503 after the request was
/// stored) would send it twice.
pub fn request_id(args: &SendArgs) -> String {
    args.request_id
        .clone()
        .unwrap_or_else(|| Uuid::new_v4().to_string())
}

/// What a send that failed in passing (no answer, 5xx, 429) says on stderr: its request id, for a retry that sends it at most once
/// (Herald may have accepted it although no answer came, and a repeat answers that one).
pub fn retry_hint(request_id: &str) -> String {
    format!(
        "retry with --request-id {request_id}: Herald sends one notification per request id, \
         also if this attempt was accepted although its answer was lost"
    )
}

/// The JSON body of `POST /api/v1/notifications` with the request id `request_id`: only the
/// fields given, for the API to check.
pub fn request_body(args: &SendArgs, request_id: &str) -> Value {
    let mut body = Map::new();
    body.insert("recipient".into(), recipient(args));
    body.insert("category".into(), json!(args.category));
    if !args.channels.is_empty() {
        body.insert("channels".into(), json!(args.channels));
    }
    if let Some(code) = &args.template {
        let mut template = Map::from_iter([("code".to_string(), json!(code))]);
        if !args.vars.is_empty() {
            template.insert(
                "variables".into(),
                Value::Object(args.vars.iter().cloned().collect()),
            );
        }
        insert_some(&mut template, "locale", &args.locale);
        body.insert("template".into(), Value::Object(template));
    } else if let Some(content) = content(args) {
        body.insert("content".into(), content);
    }
    body.insert("request_id".into(), json!(request_id));
    insert_some(&mut body, "scheduled_at", &args.scheduled_at);
    Value::Object(body)
}

/// The `recipient` object (empty when no flag names one: the API says what is missing).
fn recipient(args: &SendArgs) -> Value {
    let mut recipient = Map::new();
    insert_some(&mut recipient, "customer_id", &args.customer_id);
    insert_some(&mut recipient, "email", &args.email);
    insert_some(&mut recipient, "phone", &args.phone);
    insert_some(&mut recipient, "telegram_chat_id", &args.telegram_chat_id);
    if !args.push_tokens.is_empty() {
        recipient.insert("push_tokens".into(), json!(args.push_tokens));
    }
    insert_some(&mut recipient, "webhook_url", &args.webhook_url);
    Value::Object(recipient)
}

/// The `content` object, when any of its flags is given.
fn content(args: &SendArgs) -> Option<Value> {
    let mut content = Map::new();
    insert_some(&mut content, "subject", &args.subject);
    insert_some(&mut content, "text", &args.text);
    insert_some(&mut content, "html", &args.html);
    insert_some(&mut content, "short", &args.short);
    (!content.is_empty()).then_some(Value::Object(content))
}

fn insert_some(object: &mut Map<String, Value>, name: &str, value: &Option<String>) {
    if let Some(value) = value {
        object.insert(name.into(), json!(value));
    }
}

/// An HTTP client that sends `key` as a bearer token on every request (marked sensitive, so it
/// is never shown in debug output).
fn client(key: &str) -> anyhow::Result<reqwest::Client> {
    let mut bearer = HeaderValue::from_str(&format!("Bearer {}", key.trim()))
        .map_err(|_| anyhow::anyhow!("the API key holds characters a header cannot carry"))?;
    bearer.set_sensitive(true);
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .default_headers([(AUTHORIZATION, bearer)].into_iter().collect())
        .build()
        .context("cannot build the HTTP client")
}

/// `POST /api/v1/notifications`; the answer's JSON on 200 or 202.
async fn post(client: &reqwest::Client, base: &str, body: &Value) -> Result<Value, Failed> {
    let url = format!("{base}/api/v1/notifications");
    exchange(client.post(&url).json(body), base).await
}

/// Why a request to Herald failed.
enum Failed {
    /// Herald could not be reached, timed out, or answered 5xx or 429 (or a success that could
    /// not be read): worth asking again.
    Passing(anyhow::Error),
    /// Any other refusal (a key without the `read` scope, a request Herald finds invalid):
    /// asking again changes nothing.
    Refused(anyhow::Error),
}

/// `GET /api/v1/notifications/{id}`.
async fn get(client: &reqwest::Client, base: &str, id: &str) -> Result<Value, Failed> {
    let url = format!("{base}/api/v1/notifications/{id}");
    exchange(client.get(&url), base).await
}

/// Sends `request` to Herald at `base` and reads its answer's JSON.
async fn exchange(request: reqwest::RequestBuilder, base: &str) -> Result<Value, Failed> {
    let response = match request.send().await {
        Ok(response) => response,
        Err(err) => {
            let err = anyhow::Error::new(err).context(format!("cannot reach Herald at {base}"));
            return Err(Failed::Passing(err));
        }
    };
    let status = response.status();
    let passing = status.is_success()
        || status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
    answer(response).await.map_err(|err| {
        if passing {
            Failed::Passing(err)
        } else {
            Failed::Refused(err)
        }
    })
}

/// The JSON of a successful answer; any other is an error naming its status and body.
async fn answer(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let text = response
        .text()
        .await
        .context("cannot read the API's answer")?;
    if !status.is_success() {
        bail!("the API answered {status}: {}", text.trim());
    }
    serde_json::from_str(&text).with_context(|| format!("the API's answer is not JSON: {text}"))
}

/// The status of a notification view (`GET /api/v1/notifications/{id}`).
fn status_of(view: &Value) -> anyhow::Result<NotificationStatus> {
    serde_json::from_value(view["status"].clone())
        .with_context(|| format!("the notification's status is not one Herald knows: {view}"))
}

/// Reads the notification every [`POLL_INTERVAL`] until its status is final or `limit` has
/// passed; the last view read and its status. A read that failed for a passing reason (Herald
/// restarting, a 503) is tried again until then; the error of the last one if none succeeded
/// by the end, or of a refusal at once.
async fn wait_final(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    limit: Duration,
) -> anyhow::Result<(Value, NotificationStatus)> {
    let deadline = Instant::now() + limit;
    // The last view read, or the last passing error while none was.
    let mut last: anyhow::Result<(Value, NotificationStatus)> =
        Err(anyhow::anyhow!("no status read before the wait ended"));
    loop {
        match get(client, base, id).await {
            Ok(view) => {
                let status = status_of(&view)?;
                if status.is_final() {
                    return Ok((view, status));
                }
                last = Ok((view, status));
            }
            Err(Failed::Refused(err)) => return Err(err),
            Err(Failed::Passing(err)) if last.is_err() => last = Err(err),
            Err(Failed::Passing(_)) => {}
        }
        if Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + POLL_INTERVAL)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        send: SendArgs,
    }

    fn parse(args: &[&str]) -> Result<SendArgs, clap::Error> {
        let argv = ["send", "--key", "hk_x_y"].iter().chain(args);
        Cli::try_parse_from(argv).map(|cli| cli.send)
    }

    #[test]
    fn a_var_value_is_json_when_it_parses_and_a_string_otherwise() {
        assert_eq!(parse_var("n=3"), Ok(("n".into(), json!(3))));
        assert_eq!(
            parse_var("items=[1,\"a\"]"),
            Ok(("items".into(), json!([1, "a"])))
        );
        assert_eq!(parse_var("name=Ada"), Ok(("name".into(), json!("Ada"))));
        assert_eq!(parse_var("q=\"7\""), Ok(("q".into(), json!("7"))));
        assert_eq!(parse_var("eq=a=b"), Ok(("eq".into(), json!("a=b"))));
        assert_eq!(parse_var("empty="), Ok(("empty".into(), json!(""))));
        assert!(parse_var("no-equals").is_err());
    }

    #[test]
    fn the_default_url_reaches_the_bind_address_over_loopback() {
        let url = |bind| url_from_bind(bind).expect("a URL");
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(url("127.0.0.1:9000"), "http://127.0.0.1:9000");
        assert_eq!(url("10.1.2.3:80"), "http://10.1.2.3:80");
        assert_eq!(url("[::]:8080"), "http://[::1]:8080");
        assert_eq!(url("localhost:8080"), "http://localhost:8080");
        assert!(url_from_bind("127.0.0.1:0").is_err(), "port 0 is not known");
    }

    #[test]
    fn flags_become_the_api_request() {
        let args = parse(&[
            "--email",
            "ada@example.com",
            "--category",
            "transactional",
            "--push-token",
            "t1",
            "--push-token",
            "t2",
            "--channel",
            "push",
            "--channel",
            "email",
            "--subject",
            "Hi",
            "--text",
            "Hello",
            "--request-id",
            "r-1",
        ])
        .expect("valid flags");
        assert_eq!(request_id(&args), "r-1");
        assert_eq!(
            request_body(&args, "r-1"),
            json!({
                "recipient": {"email": "ada@example.com", "push_tokens": ["t1", "t2"]},
                "category": "transactional",
                "channels": ["push", "email"],
                "content": {"subject": "Hi", "text": "Hello"},
                "request_id": "r-1",
            })
        );
    }

    #[test]
    fn a_template_send_carries_its_variables_and_locale() {
        let args = parse(&[
            "--customer-id",
            "c-1",
            "--category",
            "account",
            "--template",
            "welcome",
            "--var",
            "name=Ada",
            "--var",
            "n=2",
            "--locale",
            "de",
        ])
        .expect("valid flags");
        assert_eq!(
            request_body(&args, "r-2"),
            json!({
                "recipient": {"customer_id": "c-1"},
                "category": "account",
                "template": {"code": "welcome", "variables": {"name": "Ada", "n": 2}, "locale": "de"},
                "request_id": "r-2",
            })
        );
    }

    #[test]
    fn a_send_without_a_request_id_gets_a_new_uuid() {
        let args =
            parse(&["--email", "ada@example.com", "--category", "account"]).expect("valid flags");
        let (first, second) = (request_id(&args), request_id(&args));
        assert!(Uuid::parse_str(&first).is_ok(), "a UUID: {first}");
        assert_ne!(first, second, "a new one for each send");
    }

    #[test]
    fn clap_refuses_only_malformed_shapes() {
        let with_category = |args: &[&'static str]| {
            let mut all = vec!["--category", "account"];
            all.extend_from_slice(args);
            parse(&all)
        };
        assert!(parse(&["--text", "x"]).is_err(), "no category");
        assert!(
            with_category(&["--var", "x"]).is_err(),
            "--var without a template"
        );
        assert!(
            with_category(&["--template", "t", "--var", "x"]).is_err(),
            "--var without ="
        );
        assert!(
            with_category(&["--template", "t", "--text", "x"]).is_err(),
            "template and content"
        );
        let args = with_category(&["--wait"]).expect("--wait alone");
        assert_eq!(args.wait, Some(60));
        assert_eq!(
            with_category(&["--wait", "5"]).expect("--wait 5").wait,
            Some(5)
        );
        assert_eq!(with_category(&[]).expect("no flags").wait, None);
    }
}
