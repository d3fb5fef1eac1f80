//! A YAML stream in, the same stream out with the sidecar injected: what
//! `queue-proxy inject` does, like `linkerd inject`.
//!
//! Two passes over the documents: the first injects every opted-in workload (inside
//! `List`s too) and notes its Service; the second points those Services at the sidecar,
//! wherever they sit in the stream.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::config::{self, SidecarConfig};
use super::error::{InjectError, Location};
use super::field::{self, Path};
use super::pod::{self, inject_requested, Injected};
use super::serving::USER_PORT_NAME;
use super::settings::InjectSettings;

/// The kinds whose pod template (`spec.template`) gets the sidecar. A bare `Pod` is
/// injected too.
pub const WORKLOAD_KINDS: [&str; 4] = ["Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"];
/// Kinds whose pods must run to completion: a queue-proxy beside them never exits, so
/// asking to inject them is an error.
const RUN_TO_COMPLETION: [&str; 2] = ["Job", "CronJob"];

/// What a stream injection did, one line per object it touched (`deployment/web
/// injected`), for the CLI to print as `linkerd inject` does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Objects in the stream, list items counted one by one (the lists themselves not).
    pub objects: usize,
    /// Objects that carry the sidecar in the output (injected now or before).
    pub injected: usize,
    pub lines: Vec<String>,
}

impl Report {
    /// `injected 1 of 3 objects`.
    pub fn summary(&self) -> String {
        format!("injected {} of {} objects", self.injected, self.objects)
    }
}

/// Injects every opted-in workload of a YAML stream (see the module documentation of
/// [`crate::inject`]); every other document passes through with the same content.
pub fn inject_stream(yaml: &str, settings: &InjectSettings) -> Result<String, InjectError> {
    inject_stream_with_report(yaml, settings).map(|(out, _)| out)
}

/// [`inject_stream`], also saying what it did.
pub fn inject_stream_with_report(
    yaml: &str,
    settings: &InjectSettings,
) -> Result<(String, Report), InjectError> {
    let mut docs = read(yaml)?;
    let mut pass = Pass {
        settings,
        report: Report::default(),
        services: BTreeMap::new(),
    };
    for (i, doc) in docs.iter_mut().enumerate() {
        pass.workloads(doc, &Path::root(), i + 1, None)?;
    }
    for (i, doc) in docs.iter_mut().enumerate() {
        pass.services(doc, &Path::root(), i + 1, None)?;
    }
    let out = write(&docs)?;
    Ok((out, pass.report))
}

/// Kubernetes reads YAML with Go's YAML 1.1 rules (`0644` is octal, `yes` a boolean);
/// the stream is read the same way so that nothing changes meaning on the way through.
pub(crate) fn read(yaml: &str) -> Result<Vec<Value>, InjectError> {
    let options = serde_saphyr::options! { legacy_octal_numbers: true };
    serde_saphyr::from_multiple_with_options(yaml, options)
        .map_err(|e| InjectError::Yaml(e.to_string()))
}

/// The writer quotes every string Go's YAML would read as something else.
fn write(docs: &[Value]) -> Result<String, InjectError> {
    serde_saphyr::to_string_multiple(docs).map_err(|e| InjectError::Write(e.to_string()))
}

/// A Service to point at the sidecar, and what it must reach.
#[derive(Debug, Clone)]
struct Target {
    workload: String,
    injected: Injected,
}

struct Pass<'a> {
    settings: &'a InjectSettings,
    report: Report,
    /// (namespace, Service name) → the workload behind it.
    services: BTreeMap<(Option<String>, String), Target>,
}

/// `Deployment web`, or `items[2] (Deployment web)` inside a list.
fn describe(obj: &Map<String, Value>, item: Option<&Path>) -> String {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("object");
    let name = obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    let what = match name {
        Some(n) => format!("{kind} {n}"),
        None => kind.to_owned(),
    };
    match item {
        Some(p) => format!("{} ({what})", p.as_str()),
        None => what,
    }
}

fn kind_of(obj: &Map<String, Value>) -> &str {
    obj.get("kind").and_then(Value::as_str).unwrap_or("")
}

/// The items of a `List` or `<Kind>List`, if this is one.
fn list_items(obj: &mut Map<String, Value>) -> Option<&mut Vec<Value>> {
    if !kind_of(obj).ends_with("List") {
        return None;
    }
    obj.get_mut("items").and_then(Value::as_array_mut)
}

fn name_and_namespace(
    obj: &Map<String, Value>,
    at: &Path,
) -> Result<(Option<String>, Option<String>), InjectError> {
    let meta_path = at.key("metadata");
    let Some(meta) = field::present(obj, "metadata") else {
        return Ok((None, None));
    };
    let meta = field::object(meta, &meta_path)?;
    let name = field::string(meta, "name", &meta_path)?.map(str::to_owned);
    let namespace = field::string(meta, "namespace", &meta_path)?
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    Ok((name, namespace))
}

impl Pass<'_> {
    /// First pass: inject the workloads of one document (or list item).
    fn workloads(
        &mut self,
        doc: &mut Value,
        at: &Path,
        document: usize,
        item: Option<&Path>,
    ) -> Result<(), InjectError> {
        let Value::Object(obj) = doc else {
            let place = Location {
                document: Some(document),
                object: item.map(|p| p.as_str().to_owned()),
            };
            let problem = format!(
                "expected a Kubernetes object (a mapping), got {}",
                field::kind_of(doc)
            );
            return Err(at.error(problem).located(&place));
        };
        if let Some(items) = list_items(obj) {
            for (j, it) in items.iter_mut().enumerate() {
                let path = at.key("items").index(j);
                self.workloads(it, &path, document, Some(&path))?;
            }
            return Ok(());
        }
        self.report.objects += 1;
        let place = Location {
            document: Some(document),
            object: Some(describe(obj, item)),
        };
        self.workload(obj, at).map_err(|e| e.located(&place))
    }

    fn workload(&mut self, obj: &mut Map<String, Value>, at: &Path) -> Result<(), InjectError> {
        let kind = kind_of(obj).to_owned();
        let is_pod = kind == "Pod";
        if RUN_TO_COMPLETION.contains(&kind.as_str()) && wants_injection(obj) {
            let template = match kind.as_str() {
                "CronJob" => at.key("spec").key("jobTemplate").key("spec"),
                _ => at.key("spec"),
            };
            let labels = template.key("template").key("metadata").key("labels");
            return Err(labels.error(format!(
                "a {kind}'s pods run to completion, and the queue-proxy beside them would never exit; \
                 only long-running workloads ({}, Pod) can be injected",
                WORKLOAD_KINDS.join(", ")
            )));
        }
        if !is_pod && !WORKLOAD_KINDS.contains(&kind.as_str()) {
            return Ok(());
        }
        // Opt-in is decided before anything is checked or touched: an object that does
        // not ask for the sidecar passes through as it is, oddities and all.
        let opt_in = if is_pod {
            obj.get("metadata")
        } else {
            obj.get("spec")
                .and_then(|s| s.get("template"))
                .and_then(|t| t.get("metadata"))
        };
        if !opt_in.is_some_and(inject_requested) {
            return Ok(());
        }

        let (name, namespace) = name_and_namespace(obj, at)?;
        // A pod may be named by its generateName.
        let name = if is_pod {
            config::workload_of_pod(&Value::Object(obj.clone()))
        } else {
            name
        };
        let template_path = if is_pod {
            at.clone()
        } else {
            at.key("spec").key("template")
        };
        let meta_path = at.key("metadata");
        let own_annotations = match field::present(obj, "metadata") {
            Some(m) => config::annotations(field::object(m, &meta_path)?, &meta_path)?,
            None => BTreeMap::new(),
        };
        let template = if is_pod {
            &mut *obj
        } else {
            let spec = field::child_object_mut(obj, "spec", at)?;
            let template = spec
                .get_mut("template")
                .filter(|t| !t.is_null())
                .ok_or_else(|| template_path.error("missing"))?;
            field::object_mut(template, &template_path)?
        };
        let template_meta_path = template_path.key("metadata");
        let template_meta = match field::present(template, "metadata") {
            Some(m) => Some(field::object(m, &template_meta_path)?),
            None => None,
        };
        let name = name.ok_or_else(|| {
            meta_path
                .key("name")
                .error("missing: the sidecar is named after its workload")
        })?;
        // The platform reads the workload's annotations; the template's count too, for
        // names the workload does not set (the webhook sees only those).
        let mut annotations = match template_meta {
            Some(m) if !is_pod => config::annotations(m, &template_meta_path)?,
            _ => BTreeMap::new(),
        };
        annotations.extend(own_annotations);
        let sidecar_config =
            SidecarConfig::from_annotations(namespace.as_deref(), &name, &annotations).map_err(
                |source| InjectError::Annotation {
                    at: Location::default(),
                    field: meta_path.key("annotations").as_str().to_owned(),
                    source: Box::new(source),
                },
            )?;

        let before = Value::Object(template.clone());
        let mut after = before.clone();
        let injected = pod::inject(&mut after, &sidecar_config, self.settings)
            .map_err(|e| e.under(template_path.as_str()))?;
        let changed = after != before;
        if let Value::Object(m) = after {
            *template = m;
        }

        self.report.injected += 1;
        self.report.lines.push(format!(
            "{}/{name} {}",
            kind.to_ascii_lowercase(),
            if changed {
                "injected"
            } else {
                "unchanged (already injected)"
            }
        ));
        let key = (namespace, sidecar_config.service.clone());
        if let Some(other) = self.services.get(&key) {
            if other.injected.serving_port != injected.serving_port
                || other.injected.user_port != injected.user_port
            {
                return Err(meta_path.key("annotations").error(format!(
                    "Service {} is also the Service of {}, whose ports differ",
                    key.1, other.workload
                )));
            }
        }
        self.services.insert(
            key,
            Target {
                workload: format!("{}/{name}", kind.to_ascii_lowercase()),
                injected,
            },
        );
        Ok(())
    }

    /// Second pass: point the injected workloads' Services at the sidecar.
    fn services(
        &mut self,
        doc: &mut Value,
        at: &Path,
        document: usize,
        item: Option<&Path>,
    ) -> Result<(), InjectError> {
        let Value::Object(obj) = doc else {
            return Ok(());
        };
        if let Some(items) = list_items(obj) {
            for (j, it) in items.iter_mut().enumerate() {
                let path = at.key("items").index(j);
                self.services(it, &path, document, Some(&path))?;
            }
            return Ok(());
        }
        if kind_of(obj) != "Service" {
            return Ok(());
        }
        let place = Location {
            document: Some(document),
            object: Some(describe(obj, item)),
        };
        let (name, namespace) = name_and_namespace(obj, at).map_err(|e| e.located(&place))?;
        let Some(name) = name else { return Ok(()) };
        let Some(target) = self.services.get(&(namespace, name.clone())) else {
            return Ok(());
        };
        let target = target.clone();
        if point_service(obj, &target.injected, at).map_err(|e| e.located(&place))? {
            self.report.lines.push(format!(
                "service/{name} targetPort → {} ({}'s queue-proxy)",
                target.injected.serving_port, target.workload
            ));
        }
        Ok(())
    }
}

/// Whether a Job or CronJob asks for the sidecar, on its pod template wherever it sits.
fn wants_injection(obj: &Map<String, Value>) -> bool {
    let template = match kind_of(obj) {
        "CronJob" => obj
            .get("spec")
            .and_then(|s| s.get("jobTemplate"))
            .and_then(|j| j.get("spec")),
        _ => obj.get("spec"),
    }
    .and_then(|s| s.get("template"));
    template
        .and_then(|t| t.get("metadata"))
        .is_some_and(inject_requested)
}

/// Points every port of the Service that reaches the user container at the sidecar's
/// serving port. Returns whether anything changed; a Service none of whose ports
/// reaches the user container or the sidecar is an error, since traffic through it
/// would bypass the queue-proxy or go nowhere.
fn point_service(
    svc: &mut Map<String, Value>,
    target: &Injected,
    at: &Path,
) -> Result<bool, InjectError> {
    let spec_path = at.key("spec");
    let spec = field::child_object_mut(svc, "spec", at)?;
    if field::string(spec, "type", &spec_path)? == Some("ExternalName") {
        return Ok(false);
    }
    let ports_path = spec_path.key("ports");
    let ports = field::list_mut(spec, "ports", &spec_path)?;
    let (mut changed, mut reaches) = (false, false);
    for (i, p) in ports.iter_mut().enumerate() {
        let at = ports_path.index(i);
        let p = field::object_mut(p, &at)?;
        let aimed = field::present(p, "targetPort")
            .or_else(|| field::present(p, "port"))
            .cloned()
            .unwrap_or(Value::Null);
        let to_user = match &aimed {
            Value::Number(n) => n.as_u64() == Some(u64::from(target.user_port)),
            Value::String(s) => {
                s == USER_PORT_NAME
                    || s.parse::<u16>().ok() == Some(target.user_port)
                    || target.named_ports.iter().any(|(n, _)| n == s)
            }
            _ => false,
        };
        let to_sidecar = match &aimed {
            Value::Number(n) => n.as_u64() == Some(u64::from(target.serving_port)),
            Value::String(s) => s == "queue-port",
            _ => false,
        };
        if to_user {
            p.insert("targetPort".into(), target.serving_port.into());
            changed = true;
        }
        reaches |= to_user || to_sidecar;
    }
    if !reaches {
        return Err(ports_path.error(format!(
            "no port targets the user container's port {} (or the queue-proxy's {}), so traffic \
             through this Service would not pass the queue-proxy",
            target.user_port, target.serving_port
        )));
    }
    Ok(changed)
}
