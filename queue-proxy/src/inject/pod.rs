//! Injection into one pod (or pod template): the serving container rewritten, the
//! sidecar added or updated in place, the grace period stretched over the drain.

use serde_json::{Map, Value};

use super::config::SidecarConfig;
use super::field::{self, Path};
use super::serving::{self, Earlier, DEFAULT_CONTAINER_ANNOTATION};
use super::settings::InjectSettings;
use super::sidecar::{Sidecar, CONTAINER_NAME, H2C_SERVING_PORT, SERVING_PORT};
use super::InjectError;
use thaw_shared::annotations::{INJECT_ENABLED, INJECT_LABEL};

/// What injection learnt about the pod, for pointing its Service at the sidecar.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Injected {
    pub user_port: u16,
    pub serving_port: u16,
    pub named_ports: Vec<(String, u16)>,
}

/// Whether an object's metadata asks for the sidecar: label `thaw.dev/inject: enabled`.
/// Pass a pod's (or a pod template's) `metadata`.
pub fn inject_requested(metadata: &Value) -> bool {
    metadata
        .get("labels")
        .and_then(|l| l.get(INJECT_LABEL))
        .and_then(Value::as_str)
        .is_some_and(|v| v.trim() == INJECT_ENABLED)
}

/// Whether a pod spec already has the sidecar (a container named `queue-proxy`).
pub fn has_sidecar(spec: &Value) -> bool {
    spec.get("containers")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(CONTAINER_NAME))
        })
}

/// Injects the sidecar into a Pod or a pod template (anything with `metadata` and
/// `spec`, such as a Deployment's `spec.template`), in place. Returns whether anything
/// changed: `false` for a pod injected before with the same settings. On error the pod
/// is left as it was.
pub fn inject_pod(
    pod: &mut Value,
    config: &SidecarConfig,
    settings: &InjectSettings,
) -> Result<bool, InjectError> {
    let mut work = pod.clone();
    inject(&mut work, config, settings)?;
    let changed = work != *pod;
    *pod = work;
    Ok(changed)
}

/// [`inject_pod`] on a copy: the injected pod.
pub fn injected_pod(
    pod: &Value,
    config: &SidecarConfig,
    settings: &InjectSettings,
) -> Result<Value, InjectError> {
    let mut work = pod.clone();
    inject(&mut work, config, settings)?;
    Ok(work)
}

pub(crate) fn inject(
    pod: &mut Value,
    config: &SidecarConfig,
    settings: &InjectSettings,
) -> Result<Injected, InjectError> {
    let root = Path::root();
    let obj = field::object_mut(pod, &root)?;
    let meta_path = root.key("metadata");
    let default_container = match field::present(obj, "metadata") {
        Some(meta) => {
            let meta = field::object(meta, &meta_path)?;
            match field::present(meta, "annotations") {
                Some(a) => {
                    let at = meta_path.key("annotations");
                    field::string(field::object(a, &at)?, DEFAULT_CONTAINER_ANNOTATION, &at)?
                        .map(str::to_owned)
                }
                None => None,
            }
        }
        None => None,
    };

    let spec_path = root.key("spec");
    let spec = match obj.get_mut("spec") {
        Some(s) if !s.is_null() => field::object_mut(s, &spec_path)?,
        _ => return Err(spec_path.error("missing")),
    };
    let containers_path = spec_path.key("containers");
    let containers = match spec.get_mut("containers") {
        Some(Value::Array(cs)) if !cs.is_empty() => cs,
        Some(Value::Array(_)) | None | Some(Value::Null) => {
            return Err(containers_path.error("missing: a pod needs at least one container"))
        }
        Some(other) => return Err(containers_path.wrong_type("a list", other)),
    };
    for (i, c) in containers.iter().enumerate() {
        let at = containers_path.index(i);
        let c = field::object(c, &at)?;
        let name = field::string(c, "name", &at)?.unwrap_or("");
        if name.is_empty() {
            return Err(at.key("name").error("missing"));
        }
        if name != CONTAINER_NAME {
            serving::check_reserved(c, &at)?;
        }
    }

    let sidecar_index = containers
        .iter()
        .position(|c| c.get("name").and_then(Value::as_str) == Some(CONTAINER_NAME));
    let earlier = match sidecar_index {
        Some(i) => {
            let at = containers_path.index(i);
            Earlier::read(field::object(&containers[i], &at)?, &at)?
        }
        None => Earlier::default(),
    };

    let serving_index =
        serving::choose(containers, default_container.as_deref(), &containers_path)?;
    let serving_path = containers_path.index(serving_index);
    let serving = serving::rewrite(
        field::object_mut(&mut containers[serving_index], &serving_path)?,
        &earlier,
        config,
        &serving_path,
    )?;
    let serving_port = if serving.h2c {
        H2C_SERVING_PORT
    } else {
        SERVING_PORT
    };

    let probe_path = serving_path.key("readinessProbe");
    let readiness_probe = serving
        .probe
        .for_queue_proxy(serving.user_port, &serving.named_ports)
        .encode(&probe_path)?;
    // The queue-proxy refuses at start a probe it cannot run; better to say so now.
    thaw_shared::probe::parse_probes(&readiness_probe, false, serving.user_port)
        .map_err(|e| probe_path.error(e.to_string()))?;
    let sidecar = Sidecar {
        config,
        settings,
        serving_port,
        user_port: serving.user_port,
        readiness_probe,
        kubelet_probe: serving
            .probe
            .for_sidecar(serving_port)
            .to_value(&probe_path)?,
    };
    match sidecar_index {
        Some(i) => sidecar.update(field::object_mut(
            &mut containers[i],
            &containers_path.index(i),
        )?),
        None => containers.push(sidecar.container()),
    }

    stretch_grace_period(spec, config, settings, &spec_path)?;

    let meta = field::child_object_mut(obj, "metadata", &root)?;
    field::child_object_mut(meta, "annotations", &meta_path)?.insert(
        DEFAULT_CONTAINER_ANNOTATION.into(),
        serving.name.clone().into(),
    );

    Ok(Injected {
        user_port: serving.user_port,
        serving_port,
        named_ports: serving.named_ports,
    })
}

/// The kubelet kills the pod `terminationGracePeriodSeconds` after deleting it; the
/// queue-proxy must by then have drained (its quiet period) and finished its longest
/// request (the revision timeout). Knative sets the revision timeout; Thaw takes the
/// larger of the two, and never shortens a longer period the pod already asks for.
fn stretch_grace_period(
    spec: &mut Map<String, Value>,
    config: &SidecarConfig,
    settings: &InjectSettings,
    at: &Path,
) -> Result<(), InjectError> {
    let key = "terminationGracePeriodSeconds";
    let current = match field::present(spec, key) {
        None => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| at.key(key).wrong_type("a whole number of seconds", v))?,
    };
    let drain = settings.drain_quiet_period.as_secs()
        + u64::from(settings.drain_quiet_period.subsec_nanos() > 0);
    let needed = config.timeout_seconds.max(drain);
    spec.insert(key.into(), current.max(needed).into());
    Ok(())
}
