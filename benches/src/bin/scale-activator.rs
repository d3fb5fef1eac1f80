//! The activator on an in-memory platform that holds many revisions: the bench's
//! `revisions` section runs it to see what revisions cost.
//!
//! It registers `--revisions` revisions (host `rev-<i>.local`), gives the first
//! `--active` of them the pods `--pods`, and then changes one active revision's pod set
//! `--updates-per-sec` times a second, round robin, between all of `--pods` and the first
//! alone: the stream of EndpointSlice changes a busy cluster sends. Everything after `--`
//! is the activator's own flags (ports, `--autoscaler-url`).
//!
//! The request path, registry, probing and stat reporting are the activator's own code;
//! only the platform differs (Kubernetes' watches are not what is measured here). It logs
//! as the activator does (JSON on stdout, `listening` once per port), and a `registered`
//! line once the revisions are queued.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use thaw_activator::platform::memory::MemoryPlatform;
use thaw_activator::platform::Platform;
use thaw_activator::reporter::RevisionStats;
use thaw_activator::revision::{RevisionId, RevisionSpec};
use thaw_shared::timeout::Timeouts;

/// The same allocator, and purging, as the activator binary: RSS compares.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
struct Args {
    /// Revisions registered.
    #[arg(long)]
    revisions: usize,
    /// How many of them (the first) have pods.
    #[arg(long)]
    active: usize,
    /// The pods' addresses, comma-separated: the churn switches between all and the first.
    #[arg(long, value_delimiter = ',', required = true)]
    pods: Vec<SocketAddr>,
    /// Pod-set changes per second, spread round robin over the active revisions.
    #[arg(long, default_value_t = 100)]
    updates_per_sec: u32,
    /// The activator's flags.
    #[arg(last = true)]
    activator: Vec<String>,
}

fn spec(i: usize) -> RevisionSpec {
    RevisionSpec {
        id: id(i),
        container_concurrency: 0,
        timeouts: Timeouts::from_secs(300, 0, 0),
        hosts: vec![format!("rev-{i}.local")],
        verify_pod_identity: false,
    }
}

fn id(i: usize) -> RevisionId {
    RevisionId::new("bench", &format!("rev-{i}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match thaw_activator::config::parse_from(
        std::iter::once("activator".to_owned()).chain(args.activator.iter().cloned()),
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("scale-activator: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(first_pod) = args.pods.first().copied() else {
        eprintln!("scale-activator: --pods is empty");
        return ExitCode::from(2);
    };
    let runtime = match thaw_shared::runtime::build(config.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("scale-activator: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    thaw_shared::logging::init_traced(&config.log_level, config.log_format.into(), None);
    let platform = Arc::new(MemoryPlatform::new());
    let started = Instant::now();
    for i in 0..args.revisions {
        platform.upsert_revision(spec(i));
    }
    let active = args.active.min(args.revisions);
    for i in 0..active {
        platform.set_pods(&id(i), vec![first_pod]);
    }
    tracing::info!(
        revisions = args.revisions,
        active,
        ms = started.elapsed().as_millis() as u64,
        "registered"
    );
    let churn = {
        let platform = Arc::clone(&platform);
        let pods = args.pods.clone();
        let per_sec = args.updates_per_sec;
        async move {
            if active == 0 || per_sec == 0 {
                return std::future::pending().await;
            }
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0usize.. {
                tick.tick().await;
                // Each revision alternates between all pods and the first alone.
                let set = if (n / active) % 2 == 0 {
                    pods.clone()
                } else {
                    vec![first_pod]
                };
                platform.set_pods(&id(n % active), set);
            }
        }
    };
    let result = runtime.block_on(async move {
        let stats = Arc::new(RevisionStats::new());
        tokio::select! {
            r = thaw_activator::run_with(config, platform as Arc<dyn Platform>, stats) => r,
            () = churn => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale-activator: {e}");
            ExitCode::FAILURE
        }
    }
}
