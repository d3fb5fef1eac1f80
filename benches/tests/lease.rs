//! Leader election through a `coordination.k8s.io` Lease
//! (`thaw_activator::platform::kubernetes::lease`), against the testbed's real API
//! server: exactly one leader, failover when the leader dies, an immediate hand-over on
//! release, followers learning the leader's stat address, a 403 named precisely, and a
//! leader cut off from the API server stepping down before anyone else may lead.
//!
//! Run with `--nocapture` to see the measured failover times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::{Api, Client};
use thaw_activator::platform::kubernetes::lease::{
    Elector, Leader, LeaseElector, LeaseSettings, STAT_ADDRESS_ANNOTATION,
};
use thaw_benches::testbed::Testbed;
use tokio::time::Instant;

const LEASE: &str = "thaw-autoscaler";

async fn until<F>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> bool,
{
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn address(identity: &str) -> String {
    let n = identity.bytes().last().unwrap_or(b'0');
    format!("10.244.9.{n}:8080")
}

fn candidate(client: &Client, ns: &str, identity: &str) -> Elector {
    LeaseElector::spawn(
        client.clone(),
        ns,
        LEASE,
        identity,
        &address(identity),
        LeaseSettings::default(),
    )
    .unwrap()
}

async fn lease(client: &Client, ns: &str) -> Lease {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get(LEASE)
        .await
        .unwrap()
}

fn holder(l: &Lease) -> Option<String> {
    l.spec.as_ref()?.holder_identity.clone()
}

fn transitions(l: &Lease) -> i32 {
    l.spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0)
}

/// Samples every candidate's `is_leader` every 10 ms and counts the samples where more
/// than one leads, until dropped.
struct Overlap {
    seen: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Overlap {
    fn watch(electors: Vec<tokio::sync::watch::Receiver<bool>>) -> Self {
        let seen = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&seen), Arc::clone(&stop));
        tokio::spawn(async move {
            while !st.load(Ordering::Relaxed) {
                if electors.iter().filter(|l| *l.borrow()).count() > 1 {
                    s.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Self { seen, stop }
    }

    fn count(&self) -> usize {
        self.seen.load(Ordering::Relaxed)
    }
}

impl Drop for Overlap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn leader_of(e: &Elector) -> Option<Leader> {
    e.leader().borrow().clone()
}

#[tokio::test]
async fn exactly_one_leads_and_followers_see_its_address() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "lease-one").await;
    let electors = [
        candidate(&client, &ns, "act-1"),
        candidate(&client, &ns, "act-2"),
    ];
    let overlap = Overlap::watch(electors.iter().map(Elector::leading).collect());
    until("a leader", Duration::from_secs(30), || {
        electors.iter().any(Elector::is_leader)
    })
    .await;
    let (leader, follower) = if electors[0].is_leader() {
        (&electors[0], &electors[1])
    } else {
        (&electors[1], &electors[0])
    };
    let me = leader_of(leader).expect("the leader sees itself");
    until(
        "the follower sees the leader",
        Duration::from_secs(10),
        || leader_of(follower).as_ref() == Some(&me),
    )
    .await;
    assert_eq!(me.address.as_deref(), Some(address(&me.identity).as_str()));
    assert_eq!(
        *follower.stat_target().borrow(),
        Some(format!("ws://{}/", address(&me.identity)))
    );
    assert_eq!(
        *leader.stat_target().borrow(),
        None,
        "the leader does not report to itself"
    );

    // Stable for several renewals: one leader, the same one, no overlap.
    let stable_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < stable_until {
        assert!(leader.is_leader() && !follower.is_leader());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(overlap.count(), 0);
    assert_eq!(leader.problem(), None);
    assert_eq!(follower.problem(), None);

    let l = lease(&client, &ns).await;
    assert_eq!(holder(&l).as_deref(), Some(me.identity.as_str()));
    let spec = l.spec.clone().unwrap();
    assert_eq!(spec.lease_duration_seconds, Some(10));
    assert_eq!(transitions(&l), 0, "created by its first holder");
    assert!(spec.acquire_time.is_some() && spec.renew_time.is_some());
    assert!(
        spec.renew_time > spec.acquire_time,
        "renewed since acquired"
    );
    assert_eq!(
        l.metadata.annotations.unwrap()[STAT_ADDRESS_ANNOTATION],
        address(&me.identity)
    );
}

#[tokio::test]
async fn a_dead_leader_is_replaced_within_15_seconds() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "lease-fail").await;
    let mut electors = vec![
        candidate(&client, &ns, "act-1"),
        candidate(&client, &ns, "act-2"),
    ];
    let mut times = Vec::new();
    for round in 0..3 {
        until("a leader", Duration::from_secs(30), || {
            electors.iter().any(Elector::is_leader)
        })
        .await;
        // Let the follower observe a few renewals, as in a cluster that has been up.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let at = electors.iter().position(Elector::is_leader).unwrap();
        let before = transitions(&lease(&client, &ns).await);
        let dead = electors.remove(at);
        let dead_name = leader_of(&dead).unwrap().identity;
        // Dies: its task stops without releasing, as when the pod is killed.
        drop(dead);
        let died = Instant::now();
        let overlap = Overlap::watch(electors.iter().map(Elector::leading).collect());
        until("a new leader", Duration::from_secs(30), || {
            electors.iter().any(Elector::is_leader)
        })
        .await;
        let failover = died.elapsed();
        times.push(failover);
        eprintln!("round {round}: failover after the leader died: {failover:?}");
        let new = electors.iter().find(|e| e.is_leader()).unwrap();
        let new_name = leader_of(new).unwrap().identity;
        assert_ne!(new_name, dead_name);
        assert_eq!(overlap.count(), 0);
        let l = lease(&client, &ns).await;
        assert_eq!(holder(&l), Some(new_name));
        assert_eq!(transitions(&l), before + 1);
        // A fresh candidate, so there is always a follower.
        electors.push(candidate(&client, &ns, &format!("act-{}", round + 3)));
    }
    let worst = times.iter().max().unwrap();
    eprintln!("failover times: {times:?}; worst {worst:?}");
    assert!(
        *worst < Duration::from_secs(15),
        "failover took {worst:?} (must be under 15 s)"
    );
}

#[tokio::test]
async fn release_hands_over_at_once() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "lease-release").await;
    let mut electors = vec![
        candidate(&client, &ns, "act-1"),
        candidate(&client, &ns, "act-2"),
    ];
    until("a leader", Duration::from_secs(30), || {
        electors.iter().any(Elector::is_leader)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at = electors.iter().position(Elector::is_leader).unwrap();
    let old = electors.remove(at);
    let follower = electors.pop().unwrap();
    let before = transitions(&lease(&client, &ns).await);
    let started = Instant::now();
    old.release().await;
    let released = started.elapsed();
    until("the follower takes over", Duration::from_secs(10), || {
        follower.is_leader()
    })
    .await;
    let handover = started.elapsed();
    eprintln!("release took {released:?}; the follower led {handover:?} after it began");
    // Within one retry period (2 s, +20 % jitter) of the release, not a lease duration.
    assert!(
        handover < Duration::from_secs(5),
        "hand-over took {handover:?}"
    );
    let l = lease(&client, &ns).await;
    assert_eq!(
        holder(&l).as_deref(),
        Some(leader_of(&follower).unwrap().identity.as_str())
    );
    assert_eq!(transitions(&l), before + 1);
}

#[tokio::test]
async fn forbidden_names_the_verb_and_the_resource() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let admin = testbed.client().await;
    let ns = testbed.namespace(&admin, "lease-rbac").await;
    let account: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "nobody"}})).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&testbed.kubeconfig).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:nobody"));
    let nobody = Client::try_from(config).unwrap();

    let elector = candidate(&nobody, &ns, "act-1");
    let mut problem = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while problem.is_none() && Instant::now() < deadline {
        problem = elector.problem();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let problem = problem.expect("a 403 is reported");
    eprintln!("as reported: {problem}");
    assert!(
        problem.contains(&format!("get leases.coordination.k8s.io in namespace {ns}")),
        "{problem}"
    );
    assert!(problem.contains("forbidden"), "{problem}");
    assert!(!elector.is_leader());
    assert_eq!(leader_of(&elector), None);
}

/// A TCP relay in front of the API server that the test can cut (connections refused
/// and open ones dropped) and restore, so one elector loses the API server at a known
/// instant while the rest of the testbed carries on.
struct Relay {
    addr: std::net::SocketAddr,
    upstream: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut relay = Relay {
            addr,
            upstream,
            task: None,
        };
        relay.serve(listener);
        relay
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            // Aborting this task drops the listener and, with the JoinSet, every relayed
            // connection.
            let mut open = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let upstream = upstream.clone();
                open.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    async fn restore(&mut self) {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    eprintln!("rebinding the relay: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot rebind the relay on {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

#[tokio::test]
async fn cut_off_leader_steps_down_before_anyone_else_can_lead() {
    let Some(testbed) = Testbed::shared() else {
        return;
    };
    let client = testbed.client().await;
    let ns = testbed.namespace(&client, "lease-outage").await;

    // Elector A reaches the API server only through the relay (the serving certificate
    // covers 127.0.0.1); B directly.
    let kubeconfig = kube::config::Kubeconfig::read_from(&testbed.kubeconfig).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let upstream = config.cluster_url.authority().unwrap().to_string();
    let mut relay = Relay::start(upstream).await;
    config.cluster_url = format!("https://{}", relay.addr).parse().unwrap();
    let relayed = Client::try_from(config).unwrap();

    let a = candidate(&relayed, &ns, "act-a");
    until("A leads", Duration::from_secs(30), || a.is_leader()).await;
    let b = candidate(&client, &ns, "act-b");
    until("B follows A", Duration::from_secs(10), || {
        leader_of(&b).is_some_and(|l| l.identity == "act-a")
    })
    .await;
    let overlap = Overlap::watch(vec![a.leading(), b.leading()]);
    tokio::time::sleep(Duration::from_secs(3)).await;

    relay.cut();
    let cut = Instant::now();
    let mut a_down = None;
    let mut b_up = None;
    while b_up.is_none() && cut.elapsed() < Duration::from_secs(30) {
        if a_down.is_none() && !a.is_leader() {
            a_down = Some(cut.elapsed());
        }
        if b.is_leader() {
            b_up = Some(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let a_down = a_down.expect("A stepped down");
    let b_up = b_up.expect("B took over");
    eprintln!("cut off at 0: A stopped leading at {a_down:?}, B led from {b_up:?}");
    let deadline = LeaseSettings::default().renew_deadline();
    // A keeps its role until its renew deadline: its last renewal was at most one renew
    // period (2 s) before the cut, so it leads for at least 6.7 - 2 s more.
    assert!(
        a_down >= deadline - Duration::from_secs(2) - Duration::from_millis(500),
        "A stepped down too early: {a_down:?}"
    );
    // ... and not after the deadline (plus the 10 ms sampling and scheduling).
    assert!(
        a_down <= deadline + Duration::from_millis(500),
        "A led past its renew deadline: {a_down:?}"
    );
    // B takes over only once A's lease expired as B observed it: a third of the lease
    // duration after A stopped at the earliest, and within the failover bound.
    assert!(
        b_up >= a_down + Duration::from_secs(2),
        "B led {:?} after A stopped",
        b_up - a_down
    );
    assert!(b_up < Duration::from_secs(15), "failover took {b_up:?}");
    assert_eq!(overlap.count(), 0, "two leaders at once");
    let problem = a.problem().expect("A reports the failure");
    assert!(
        problem.contains(&format!("lease {ns}/{LEASE}")),
        "{problem}"
    );

    // Reachable again: A follows B and its problem clears.
    relay.restore().await;
    until("A follows B", Duration::from_secs(15), || {
        leader_of(&a).is_some_and(|l| l.identity == "act-b")
    })
    .await;
    until("A's problem clears", Duration::from_secs(10), || {
        a.problem().is_none()
    })
    .await;
    assert!(!a.is_leader() && b.is_leader());
    assert_eq!(overlap.count(), 0, "two leaders at once");
    let l = lease(&client, &ns).await;
    assert_eq!(holder(&l).as_deref(), Some("act-b"));
    assert_eq!(transitions(&l), 1);
}
