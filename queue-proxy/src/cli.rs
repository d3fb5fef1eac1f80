//! The queue-proxy's command-line entry point, as a library function so that another
//! binary (the activator, running the local platform) can act as a queue-proxy too.
//! `queue-proxy inject` is the one subcommand: it adds the sidecar to manifests.

use std::io::{Read, Write};
use std::process::ExitCode;

use crate::config::{self, Config};
use crate::inject::{self, InjectSettings};

/// Exit status for a configuration error (sysexits' EX_USAGE, as linkerd2-proxy uses).
pub const EXIT_CONFIG: u8 = 64;

/// Reads the environment, sets up logging and the runtime, and runs until drained.
/// `args` excludes the program name.
pub fn main(args: &[String]) -> ExitCode {
    match args.first().map(String::as_str) {
        None => {}
        Some("--help" | "-h" | "help") => {
            print!("{}", config::help());
            println!("\nqueue-proxy inject [FILE|-] adds the sidecar to manifests (see queue-proxy inject --help).");
            return ExitCode::SUCCESS;
        }
        Some("inject") => return inject(&args[1..]),
        Some("--version" | "-V") => {
            println!("queue-proxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "queue-proxy: unexpected argument {other:?}; configuration comes from the environment (see --help)"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let config = match Config::from_process_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("queue-proxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The local platform's activator started us: die with it, and not start without it.
    if let Some(parent) = config.parent_pid {
        if let Err(e) = thaw_shared::lifeline::die_with_parent(parent) {
            eprintln!("queue-proxy: {e}");
            return ExitCode::FAILURE;
        }
    }
    // Before the runtime exists, so no other thread sees standard input borrowed. A
    // descriptor that is not a listener is a bad THAW_LISTEN_FDS, like any bad variable.
    let inherited = match crate::Inherited::adopt(&config) {
        Ok(inherited) => inherited,
        Err(e) => {
            eprintln!("queue-proxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let tracing_config = &config.observability.tracing;
    let (exporter, tracer) = if tracing_config.is_on() {
        // Knative's queue-proxy names its traces after the user's service.
        let service = [&config.configuration, &config.revision]
            .into_iter()
            .find(|s| !s.is_empty())
            .map_or("queue-proxy", String::as_str);
        let resource = [
            ("service.name", service),
            ("k8s.pod.name", config.pod.as_str()),
            ("k8s.namespace.name", config.namespace.as_str()),
            ("kn.revision.name", config.revision.as_str()),
        ];
        match thaw_shared::trace::Tracing::start(tracing_config, &resource) {
            Ok((exporter, tracer)) => (Some(exporter), Some(tracer)),
            // A bad OTEL_* variable is a bad setting, as a bad variable of ours is.
            Err(e) if e.is_config() => {
                eprintln!("queue-proxy: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                eprintln!("queue-proxy: tracing: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        (None, None)
    };
    crate::logging::init(&config.logging_level, tracer);

    // A sidecar is sized for about one core: a current-thread runtime beats a pool there
    // (measured in benches/), so more threads are opt-in.
    let runtime = thaw_shared::runtime::build(Some(config.worker_threads.unwrap_or(1)));
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("queue-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(crate::run_with(config, inherited));
    // Drained: the last spans leave before the process does.
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "queue-proxy failed");
            eprintln!("queue-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `queue-proxy inject --help`.
const INJECT_HELP: &str = "\
queue-proxy inject: add Thaw's queue-proxy sidecar to Kubernetes manifests.

Usage: queue-proxy inject [FILE|-] [--image IMAGE]

Reads a YAML stream (FILE, or stdin when FILE is - or absent) and writes it to stdout
with the sidecar added to every Deployment, ReplicaSet, StatefulSet, DaemonSet or Pod
whose pod template has the label thaw.dev/inject: enabled, and the Services of those
workloads (thaw.dev/service, default the workload's name) pointed at the sidecar. Other
documents pass through unchanged in content (keys sorted, comments dropped). Injecting
twice changes nothing. What was done goes to stderr.

    kubectl get deploy web -o yaml | queue-proxy inject - | kubectl apply -f -

Options:
  --image IMAGE   the sidecar image [env THAW_QUEUE_PROXY_IMAGE, default ghcr.io/thaw-dev/queue-proxy:0.1.0]
  -h, --help      this text

Exit status: 0 done, 64 bad arguments or bad input (the message names the document and
field), 1 cannot read the input or write the output.
";

/// What `queue-proxy inject` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InjectCommand {
    Help,
    Run {
        /// `None`: stdin.
        file: Option<String>,
        image: String,
    },
}

/// Parses `inject`'s arguments; `env_image` is `THAW_QUEUE_PROXY_IMAGE`.
pub fn parse_inject_args(
    args: &[String],
    env_image: Option<&str>,
) -> Result<InjectCommand, String> {
    let mut file = None;
    let mut image = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(InjectCommand::Help),
            "--image" => match rest.next() {
                Some(v) if !v.is_empty() => image = Some(v.clone()),
                _ => return Err("--image needs an image name".into()),
            },
            a if a.starts_with("--image=") => {
                let v = &a["--image=".len()..];
                if v.is_empty() {
                    return Err("--image needs an image name".into());
                }
                image = Some(v.to_owned());
            }
            "-" if file.is_none() => file = Some("-".to_owned()),
            a if a.starts_with('-') => return Err(format!("unknown option {a:?}")),
            a if file.is_none() => file = Some(a.to_owned()),
            a => return Err(format!("one input at a time; unexpected {a:?}")),
        }
    }
    let image = image
        .or_else(|| {
            env_image
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| inject::DEFAULT_IMAGE.to_owned());
    Ok(InjectCommand::Run {
        file: file.filter(|f| f != "-"),
        image,
    })
}

/// `queue-proxy inject [FILE|-] [--image IMAGE]`: the stream on stdout, what was done
/// on stderr (`deployment/web injected`, then `injected 1 of 3 objects`).
pub fn inject(args: &[String]) -> ExitCode {
    let env_image = std::env::var(inject::IMAGE_ENV).ok();
    let (file, image) = match parse_inject_args(args, env_image.as_deref()) {
        Ok(InjectCommand::Help) => {
            print!("{INJECT_HELP}");
            return ExitCode::SUCCESS;
        }
        Ok(InjectCommand::Run { file, image }) => (file, image),
        Err(e) => {
            eprintln!("queue-proxy inject: {e} (see --help)");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let input = match &file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}")),
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map(|_| text)
                .map_err(|e| format!("cannot read stdin: {e}"))
        }
    };
    let input = match input {
        Ok(text) => text,
        Err(e) => {
            eprintln!("queue-proxy inject: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (output, report) =
        match inject::inject_stream_with_report(&input, &InjectSettings::with_image(image)) {
            Ok(done) => done,
            Err(e) => {
                let source = file.as_deref().unwrap_or("stdin");
                eprintln!("queue-proxy inject: {source}: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(output.as_bytes())
        .and_then(|()| stdout.flush())
    {
        eprintln!("queue-proxy inject: cannot write the output: {e}");
        return ExitCode::FAILURE;
    }
    for line in &report.lines {
        eprintln!("{line}");
    }
    eprintln!("{}", report.summary());
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn inject_arguments() {
        let run = |file: Option<&str>, image: &str| InjectCommand::Run {
            file: file.map(str::to_owned),
            image: image.to_owned(),
        };
        assert_eq!(
            parse_inject_args(&args(&[]), None),
            Ok(run(None, inject::DEFAULT_IMAGE))
        );
        assert_eq!(
            parse_inject_args(&args(&["-"]), Some("env/qp")),
            Ok(run(None, "env/qp"))
        );
        assert_eq!(
            parse_inject_args(&args(&["app.yaml", "--image", "my/qp:1"]), Some("env/qp")),
            Ok(run(Some("app.yaml"), "my/qp:1"))
        );
        assert_eq!(
            parse_inject_args(&args(&["--image=my/qp", "app.yaml"]), Some("  ")),
            Ok(run(Some("app.yaml"), "my/qp"))
        );
        assert_eq!(
            parse_inject_args(&args(&["x", "--help"]), None),
            Ok(InjectCommand::Help)
        );
        for bad in [&["--image"][..], &["--image="], &["a", "b"], &["--colour"]] {
            assert!(parse_inject_args(&args(bad), None).is_err(), "{bad:?}");
        }
    }
}
