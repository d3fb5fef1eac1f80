//! `thaw-testbed-node`: the testbed's node (`run`), and the helper that starts each of its
//! containers inside the pod's namespaces (`pod-exec`). `benches/testbed/up.sh` starts
//! `run`; nobody starts `pod-exec` by hand.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use thaw_benches::testbed::node::{self, NodeConfig};
use thaw_benches::testbed::podexec::{self, Bind, PodExec};

#[derive(Parser)]
#[command(about = "The Thaw testbed's node: runs pods as processes in network namespaces")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register the node and run the pods bound to it until SIGTERM.
    Run {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long)]
        scheduler_kubeconfig: PathBuf,
        #[arg(long, default_value = "testbed-node")]
        node_name: String,
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        bridge: String,
        #[arg(long)]
        netns_prefix: String,
        #[arg(long)]
        pod_cidr: String,
        #[arg(long)]
        gateway: Ipv4Addr,
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
        #[arg(long)]
        images: PathBuf,
    },
    /// Inside a pod: print the user the in-cluster credentials authenticate as.
    Whoami,
    /// Enter a pod's namespaces and exec a container's program (used by `run`).
    PodExec {
        #[arg(long)]
        netns: Option<PathBuf>,
        #[arg(long)]
        hostname: String,
        #[arg(long = "bind", value_parser = Bind::from_arg)]
        binds: Vec<Bind>,
        #[arg(long)]
        workdir: Option<PathBuf>,
        #[arg(long)]
        parent_pid: i32,
        program: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Whoami => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let result = match runtime {
                Ok(rt) => rt.block_on(thaw_benches::testbed::whoami::whoami()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(user) => {
                    println!("{user}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("thaw-testbed-node whoami: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::PodExec {
            netns,
            hostname,
            binds,
            workdir,
            parent_pid,
            program,
            args,
        } => {
            let spec = PodExec {
                netns,
                hostname,
                binds,
                workdir,
                parent: parent_pid,
                program,
                args,
            };
            // Only returns on failure; the line lands in the container's log.
            let reason = podexec::exec(&spec);
            eprintln!("thaw-testbed-node pod-exec: {reason}");
            ExitCode::from(if reason.starts_with("cannot execute") {
                127
            } else {
                126
            })
        }
        Command::Run {
            kubeconfig,
            scheduler_kubeconfig,
            node_name,
            state_dir,
            bridge,
            netns_prefix,
            pod_cidr,
            gateway,
            cluster_domain,
            images,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            let config = NodeConfig {
                kubeconfig,
                scheduler_kubeconfig,
                node_name,
                state_dir,
                bridge,
                netns_prefix,
                pod_cidr,
                gateway,
                cluster_domain,
                images,
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("thaw-testbed-node: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(node::run(config, shutdown())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("thaw-testbed-node: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
