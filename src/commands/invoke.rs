//! `thaw invoke NAME [PAYLOAD]`: a small client for thawd's Invoke API, for the demo and for
//! people without the AWS CLI. The response payload goes to stdout; with `--log-type tail` the
//! decoded log tail goes to stderr. A function error or an API error exits 1 with Lambda's
//! error on stderr.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;

/// How to invoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InvocationType {
    /// Wait for the answer.
    RequestResponse,
    /// Queue it (202) and return.
    Event,
    /// Only check that the function exists (204).
    DryRun,
}

impl InvocationType {
    fn header(self) -> &'static str {
        match self {
            Self::RequestResponse => "RequestResponse",
            Self::Event => "Event",
            Self::DryRun => "DryRun",
        }
    }
}

/// One invocation's request.
pub struct InvokeArgs {
    /// thawd's base URL.
    pub endpoint: String,
    /// The function.
    pub function: String,
    /// The event.
    pub payload: Vec<u8>,
    /// How.
    pub invocation_type: InvocationType,
    /// Return the log tail.
    pub tail: bool,
    /// Give up after this long.
    pub timeout: Duration,
}

/// What came back.
#[derive(Debug)]
pub struct InvokeResult {
    /// HTTP status.
    pub status: u16,
    /// `X-Amz-Function-Error`.
    pub function_error: Option<String>,
    /// `x-amzn-ErrorType` of an API error.
    pub error_type: Option<String>,
    /// The decoded `X-Amz-Log-Result`.
    pub log: Option<Vec<u8>>,
    /// The body.
    pub body: Vec<u8>,
}

fn header(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Sends one invocation.
pub fn invoke(args: &InvokeArgs) -> anyhow::Result<InvokeResult> {
    let url = format!(
        "{}/2015-03-31/functions/{}/invocations",
        args.endpoint.trim_end_matches('/'),
        args.function
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(args.timeout))
        .build()
        .into();
    let mut request = agent
        .post(&url)
        .header("X-Amz-Invocation-Type", args.invocation_type.header());
    if args.tail {
        request = request.header("X-Amz-Log-Type", "Tail");
    }
    let mut response = request
        .send(&args.payload[..])
        .with_context(|| format!("cannot reach thawd at {}", args.endpoint))?;
    let log = match header(&response, "X-Amz-Log-Result") {
        Some(b64) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .context("thawd sent a log tail that is not base64")?,
        ),
        None => None,
    };
    let result = InvokeResult {
        status: response.status().as_u16(),
        function_error: header(&response, "X-Amz-Function-Error"),
        error_type: header(&response, "x-amzn-ErrorType"),
        log,
        body: Vec::new(),
    };
    let body = response
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_vec()
        .context("cannot read thawd's answer")?;
    Ok(InvokeResult { body, ..result })
}

/// Runs `thaw invoke`: prints the payload and returns the exit status (0, or 1 on an error).
pub fn run(args: &InvokeArgs) -> anyhow::Result<u8> {
    let result = invoke(args)?;
    if let Some(log) = &result.log {
        let _ = std::io::stderr().write_all(log);
    }
    if let Some(kind) = &result.error_type {
        anyhow::bail!(
            "thawd answered {} {kind}: {}",
            result.status,
            String::from_utf8_lossy(&result.body)
        );
    }
    std::io::stdout()
        .write_all(&result.body)
        .context("cannot write the response")?;
    if !result.body.is_empty() {
        println!();
    }
    if let Some(error) = &result.function_error {
        eprintln!("thaw invoke: the function failed ({error})");
        return Ok(1);
    }
    match result.status {
        200 | 202 | 204 => Ok(0),
        other => {
            eprintln!("thaw invoke: unexpected status {other}");
            Ok(1)
        }
    }
}
