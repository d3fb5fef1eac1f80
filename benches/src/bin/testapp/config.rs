//! Startup configuration from flags and environment variables.
//!
//! Flags are parsed by hand: there are only a handful, and keeping clap out
//! keeps the baseline binary small. A flag always wins over its environment
//! variable, which wins over the default, so a test can pin `--port 0` even
//! when the surrounding environment sets `PORT` the way Knative does.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::time::Duration;

/// The port Knative gives user containers when `PORT` is not set.
const DEFAULT_PORT: u16 = 8080;

/// Printed by `--help`.
pub const USAGE: &str = "\
thaw-testapp: the HTTP app Thaw's tests and benchmarks put behind the proxies.

USAGE:
    thaw-testapp [FLAGS]

FLAGS (a flag overrides its environment variable; --flag=value also works):
    --port N              port to listen on, 0 = ephemeral   [env PORT, default 8080]
    --host ADDR           IP address to listen on            [default 127.0.0.1]
    --slow-start-ms N     sleep N ms before binding          [env SLOW_START_MS, default 0]
    --max-concurrency N   more than N requests in flight is a violation: count it
                          and answer 500, 0 = unchecked      [env MAX_CONCURRENCY, default 0]
    --threads N           tokio worker threads, 1 = current-thread runtime
                                                             [default: one per core]
    -h, --help            print this help and exit

Once listening, prints one line to stdout: \"listening on ADDR:PORT\"; on SIGTERM
or Ctrl-C, one more, \"stopping on signal (ready: true|false)\", and exits 0.
Bad flag or environment values: one line on stderr, exit code 64.

ROUTES (query parameters in brackets are optional, with their defaults):
    /, /hello             200 \"hello world\\n\" (text/plain)
    /echo                 any method: streams the request body back as it arrives
    /headers              200 JSON {method, uri, version, headers: {name: [values]}}
    /delay?ms=N           sleep N ms, then 200 \"ok\"
    /status?code=N        answer status N (200-999) with body \"status N\"
    /bytes?n=N            200 with exactly N bytes of 'x', content-length set
    /stream[?chunks=5&interval_ms=0&size=16]
                          chunked 200: `chunks` chunks of `size` bytes, one every interval
    /sse[?events=5&interval_ms=0]
                          text/event-stream: \"data: event <i>\\n\\n\", i from 0, then ends
    /ws                   websocket echo of text and binary messages (HTTP/1.1 Upgrade)
    /reset                200 + chunk \"partial\", then the response is aborted
    /close                the connection is dropped without any response
    /hang                 never answers
    /hang-body            200 + chunk \"started\\n\", then the body never ends
    /crash                the process exits with status 3 at once
    /healthz              200 \"ok\", or 503 \"not ready\" after /ready?state=off;
                          with `K-Network-Probe: queue`, 200 \"queue\" as a queue-proxy
    /ready?state=on|off   toggle readiness (also drives gRPC health)
    /stats                200 JSON {in_flight, max_in_flight, violations, requests}
    /stats/reset          zero max_in_flight, violations and requests
    POST /grpc.health.v1.Health/Check
                          gRPC health: SERVING, or NOT_SERVING when the service is
                          \"notserving\" or readiness is off
    anything else         404 \"not found\"

In-flight counting covers every route except /stats, /stats/reset, /healthz,
/ready and gRPC health; a request stays in flight until its response body has
been fully produced, or it was dropped. A websocket stops counting once its
101 is sent.
";

/// A configuration the server can run with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub slow_start: Duration,
    /// 0 means unchecked.
    pub max_concurrency: usize,
    /// `None` lets tokio pick (one worker per core).
    pub threads: Option<usize>,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Config),
    Help,
}

/// A bad flag or environment value, rendered as one line for stderr.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (see --help)", self.0)
    }
}

/// Reads this process's arguments and environment.
pub fn from_process() -> Result<Command, UsageError> {
    let args = std::env::args_os()
        .skip(1)
        .map(|arg| {
            arg.into_string()
                .map_err(|bad| UsageError(format!("argument {bad:?} is not valid UTF-8")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    parse(args, |name| match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(UsageError(format!(
            "environment variable {name} is not valid UTF-8"
        ))),
    })
}

/// Flag values seen on the command line, before environment fallbacks.
#[derive(Default)]
struct Flags {
    host: Option<String>,
    port: Option<String>,
    slow_start_ms: Option<String>,
    max_concurrency: Option<String>,
    threads: Option<String>,
}

/// Parses `args` (without the program name), falling back to `env` for the
/// values Knative-style deployments pass through the environment.
pub fn parse<I, E>(args: I, env: E) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = String>,
    E: Fn(&str) -> Result<Option<String>, UsageError>,
{
    let mut flags = Flags::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let slot = match name.as_str() {
            "--host" => &mut flags.host,
            "--port" => &mut flags.port,
            "--slow-start-ms" => &mut flags.slow_start_ms,
            "--max-concurrency" => &mut flags.max_concurrency,
            "--threads" => &mut flags.threads,
            _ => return Err(UsageError(format!("unknown argument {name:?}"))),
        };
        let value = match inline {
            Some(value) => value,
            None => args
                .next()
                .ok_or_else(|| UsageError(format!("{name} needs a value")))?,
        };
        *slot = Some(value);
    }

    // An empty variable is treated as unset, as shells make that easy to do by accident.
    let from_env = |name: &str| -> Result<Option<(String, String)>, UsageError> {
        Ok(env(name)?
            .filter(|value| !value.is_empty())
            .map(|value| (name.to_owned(), value)))
    };
    let pick =
        |flag: Option<String>, flag_name: &str, env_name: Option<&str>| match (flag, env_name) {
            (Some(value), _) => Ok(Some((flag_name.to_owned(), value))),
            (None, Some(env_name)) => from_env(env_name),
            (None, None) => Ok(None),
        };

    let host = match pick(flags.host, "--host", None)? {
        Some((source, value)) => parse_value(&source, &value, "an IP address")?,
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let port = match pick(flags.port, "--port", Some("PORT"))? {
        Some((source, value)) => parse_value(&source, &value, "a port number 0-65535")?,
        None => DEFAULT_PORT,
    };
    let slow_start_ms: u64 = match pick(
        flags.slow_start_ms,
        "--slow-start-ms",
        Some("SLOW_START_MS"),
    )? {
        Some((source, value)) => parse_value(&source, &value, "a number of milliseconds")?,
        None => 0,
    };
    let max_concurrency = match pick(
        flags.max_concurrency,
        "--max-concurrency",
        Some("MAX_CONCURRENCY"),
    )? {
        Some((source, value)) => parse_value(&source, &value, "a non-negative integer")?,
        None => 0,
    };
    let threads = match pick(flags.threads, "--threads", None)? {
        Some((source, value)) => match parse_value(&source, &value, "a positive integer")? {
            0 => return Err(invalid(&source, &value, "a positive integer")),
            n => Some(n),
        },
        None => None,
    };

    Ok(Command::Run(Config {
        host,
        port,
        slow_start: Duration::from_millis(slow_start_ms),
        max_concurrency,
        threads,
    }))
}

fn parse_value<T: FromStr>(source: &str, value: &str, expected: &str) -> Result<T, UsageError> {
    value.parse().map_err(|_| invalid(source, value, expected))
}

fn invalid(source: &str, value: &str, expected: &str) -> UsageError {
    UsageError(format!(
        "invalid value {value:?} for {source}: expected {expected}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Command, UsageError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        parse(args.iter().map(|a| (*a).to_owned()), move |name| {
            Ok(env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        })
    }

    fn config(args: &[&str], env: &[(&str, &str)]) -> Config {
        match run(args, env) {
            Ok(Command::Run(config)) => config,
            other => panic!("expected a config, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = config(&[], &[]);
        assert_eq!(c.host, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(c.port, 8080);
        assert_eq!(c.slow_start, Duration::ZERO);
        assert_eq!(c.max_concurrency, 0);
        assert_eq!(c.threads, None);
    }

    #[test]
    fn env_then_flags_override() {
        let env = [
            ("PORT", "9000"),
            ("SLOW_START_MS", "5"),
            ("MAX_CONCURRENCY", "2"),
        ];
        let c = config(&[], &env);
        assert_eq!(
            (c.port, c.slow_start, c.max_concurrency),
            (9000, Duration::from_millis(5), 2)
        );
        let c = config(
            &[
                "--port",
                "0",
                "--slow-start-ms=7",
                "--max-concurrency",
                "3",
                "--threads",
                "1",
            ],
            &env,
        );
        assert_eq!(c.port, 0);
        assert_eq!(c.slow_start, Duration::from_millis(7));
        assert_eq!(c.max_concurrency, 3);
        assert_eq!(c.threads, Some(1));
    }

    #[test]
    fn empty_env_is_unset() {
        assert_eq!(config(&[], &[("PORT", "")]).port, 8080);
    }

    #[test]
    fn host_flag() {
        let c = config(&["--host", "0.0.0.0"], &[]);
        assert_eq!(c.host, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }

    #[test]
    fn help() {
        assert_eq!(run(&["--port", "1", "--help"], &[]), Ok(Command::Help));
        assert_eq!(run(&["-h"], &[]), Ok(Command::Help));
    }

    #[test]
    fn bad_values() {
        for (args, env) in [
            (&["--port", "abc"][..], &[][..]),
            (&["--port", "70000"][..], &[][..]),
            (&["--port"][..], &[][..]),
            (&["--threads", "0"][..], &[][..]),
            (&["--host", "nope"][..], &[][..]),
            (&["--bogus"][..], &[][..]),
            (&[][..], &[("PORT", "x")][..]),
            (&[][..], &[("MAX_CONCURRENCY", "-1")][..]),
        ] {
            let err = run(args, env).expect_err("should be rejected");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
    }
}
