//! What the node knows of a pod, and the `PodStatus` it reports from that: phase, IPs,
//! conditions and container statuses with restarts. The EndpointSlice and ReplicaSet
//! controllers act on exactly these fields, so they follow the kubelet's rules.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// One container, as its runner last saw it.
#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub state: State,
    pub last_state: Option<State>,
    pub restarts: i32,
    pub ready: bool,
    /// The startup probe passed (or there is none) for the current run.
    pub started: bool,
    /// It ran at least once.
    pub ever_started: bool,
    /// Its runner has returned: it will not run again.
    pub finished: bool,
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
    },
}

impl Container {
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            image_id: String::new(),
            state: State::Waiting {
                reason: "ContainerCreating".to_owned(),
                message: None,
            },
            last_state: None,
            restarts: 0,
            ready: false,
            started: false,
            ever_started: false,
            finished: false,
            pid: None,
        }
    }

    pub fn exit_code(&self) -> Option<i32> {
        match &self.state {
            State::Terminated { exit_code, .. } => Some(*exit_code),
            _ => None,
        }
    }
}

/// The pod as the node sees it.
#[derive(Debug, Clone)]
pub struct PodState {
    pub host_ip: Ipv4Addr,
    pub pod_ip: Option<Ipv4Addr>,
    pub start_time: Timestamp,
    pub sandbox_ready: bool,
    pub initialized: bool,
    pub init: Vec<Container>,
    pub main: Vec<Container>,
    /// When each condition last changed, so `lastTransitionTime` moves only on change.
    transitions: HashMap<&'static str, (bool, Timestamp)>,
}

impl PodState {
    pub fn new(host_ip: Ipv4Addr, init: Vec<Container>, main: Vec<Container>) -> Self {
        Self {
            host_ip,
            pod_ip: None,
            start_time: Timestamp::now(),
            sandbox_ready: false,
            initialized: init.is_empty(),
            init,
            main,
            transitions: HashMap::new(),
        }
    }

    /// The kubelet's phase rules: terminal once every container has stopped for good,
    /// Running once one has run after initialisation, Pending before.
    pub fn phase(&self) -> &'static str {
        let init_failed = self
            .init
            .iter()
            .any(|c| c.finished && c.exit_code().is_some_and(|code| code != 0));
        if init_failed {
            return "Failed";
        }
        if !self.main.is_empty() && self.main.iter().all(|c| c.finished) {
            let all_ok = self.main.iter().all(|c| c.exit_code() == Some(0));
            return if all_ok { "Succeeded" } else { "Failed" };
        }
        if self.initialized && self.main.iter().any(|c| c.ever_started) {
            "Running"
        } else {
            "Pending"
        }
    }

    pub fn ready(&self) -> bool {
        self.phase() == "Running" && self.main.iter().all(|c| c.ready)
    }

    /// The status to report; `now` stamps conditions that changed since the last call.
    pub fn status(&mut self, now: Timestamp) -> PodStatus {
        let ready = self.ready();
        let conditions = [
            ("PodReadyToStartContainers", self.sandbox_ready),
            ("Initialized", self.initialized),
            ("ContainersReady", ready),
            ("Ready", ready),
            ("PodScheduled", true),
        ]
        .into_iter()
        .map(|(kind, status)| {
            let entry = self.transitions.entry(kind).or_insert((status, now));
            if entry.0 != status {
                *entry = (status, now);
            }
            PodCondition {
                type_: kind.to_owned(),
                status: if status { "True" } else { "False" }.to_owned(),
                last_transition_time: Some(Time(entry.1)),
                reason: (!status && (kind == "Ready" || kind == "ContainersReady"))
                    .then(|| "ContainersNotReady".to_owned()),
                ..PodCondition::default()
            }
        })
        .collect();
        PodStatus {
            phase: Some(self.phase().to_owned()),
            conditions: Some(conditions),
            host_ip: Some(self.host_ip.to_string()),
            host_ips: Some(vec![HostIP {
                ip: self.host_ip.to_string(),
            }]),
            pod_ip: self.pod_ip.map(|ip| ip.to_string()),
            pod_ips: self.pod_ip.map(|ip| vec![PodIP { ip: ip.to_string() }]),
            start_time: Some(Time(self.start_time)),
            // The API server computes the QoS class at creation and refuses any change
            // to it, so a merge patch leaves it out (a pod with requests is Burstable).
            qos_class: None,
            container_statuses: Some(self.main.iter().map(container_status).collect()),
            init_container_statuses: (!self.init.is_empty())
                .then(|| self.init.iter().map(container_status).collect()),
            ..PodStatus::default()
        }
    }
}

fn container_status(c: &Container) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone(),
        container_id: c.pid.map(|pid| format!("thaw-testbed://{pid}")),
        ready: c.ready,
        started: Some(c.started),
        restart_count: c.restarts,
        state: Some(api_state(&c.state)),
        last_state: Some(c.last_state.as_ref().map(api_state).unwrap_or_default()),
        ..ContainerStatus::default()
    }
}

fn api_state(state: &State) -> ContainerState {
    match state {
        State::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..ContainerState::default()
        },
        State::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(*started_at)),
            }),
            ..ContainerState::default()
        },
        State::Terminated {
            exit_code,
            signal,
            reason,
            message,
            started_at,
            finished_at,
        } => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: *exit_code,
                signal: *signal,
                reason: Some(reason.clone()),
                message: message.clone(),
                started_at: started_at.map(Time),
                finished_at: Some(Time(*finished_at)),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn running(c: &mut Container) {
        c.state = State::Running {
            started_at: Timestamp::now(),
        };
        c.ever_started = true;
        c.started = true;
    }

    fn exited(c: &mut Container, code: i32) {
        c.state = State::Terminated {
            exit_code: code,
            signal: None,
            reason: if code == 0 { "Completed" } else { "Error" }.to_owned(),
            message: None,
            started_at: None,
            finished_at: Timestamp::now(),
        };
        c.finished = true;
        c.ready = false;
    }

    fn pod() -> PodState {
        PodState::new(
            Ipv4Addr::new(10, 244, 1, 1),
            vec![],
            vec![
                Container::new("app", "thaw.local/testapp"),
                Container::new("qp", "x"),
            ],
        )
    }

    #[test]
    fn phases_follow_the_kubelet() {
        let mut p = pod();
        assert_eq!(p.phase(), "Pending");
        running(&mut p.main[0]);
        assert_eq!(p.phase(), "Running");
        assert!(!p.ready());
        p.main[0].ready = true;
        p.main[1].ready = true;
        assert!(p.ready());
        exited(&mut p.main[0], 0);
        assert_eq!(p.phase(), "Running");
        exited(&mut p.main[1], 0);
        assert_eq!(p.phase(), "Succeeded");
        exited(&mut p.main[1], 137);
        assert_eq!(p.phase(), "Failed");
    }

    #[test]
    fn init_containers_gate_running_and_can_fail_the_pod() {
        let mut p = PodState::new(
            Ipv4Addr::LOCALHOST,
            vec![Container::new("init", "x")],
            vec![Container::new("app", "x")],
        );
        assert!(!p.initialized);
        running(&mut p.main[0]);
        assert_eq!(p.phase(), "Pending");
        exited(&mut p.init[0], 1);
        assert_eq!(p.phase(), "Failed");
    }

    #[test]
    fn conditions_move_only_on_change() {
        let mut p = pod();
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let s0 = p.status(t0);
        let ready = |s: &PodStatus| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == "Ready")
                .cloned()
                .unwrap()
        };
        assert_eq!(ready(&s0).status, "False");
        let s1 = p.status(t1);
        assert_eq!(ready(&s1).last_transition_time, Some(Time(t0)));
        for c in &mut p.main {
            running(c);
            c.ready = true;
        }
        p.pod_ip = Some(Ipv4Addr::new(10, 244, 1, 2));
        let s2 = p.status(t1);
        assert_eq!(ready(&s2).status, "True");
        assert_eq!(ready(&s2).last_transition_time, Some(Time(t1)));
        assert_eq!(s2.pod_ip.as_deref(), Some("10.244.1.2"));
        assert_eq!(s2.container_statuses.unwrap()[0].restart_count, 0);
    }
}
