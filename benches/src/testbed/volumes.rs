//! Pod volumes, made as host directories under the pod's own folder and bind-mounted at
//! each container's `mountPath` by `pod-exec`: `emptyDir`, `configMap`, `secret`,
//! `downwardAPI`, `hostPath` and `projected`, whose `serviceAccountToken` source comes
//! from the TokenRequest API. That projected volume is what the ServiceAccount admission
//! plugin adds to every pod, so in-cluster clients (kube-rs, client-go) find the token,
//! `ca.crt` and `namespace` where they look.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount,
};
use kube::api::PostParams;
use kube::{Api, Client};

use super::env::{self, EnvContext};
use super::podexec::Bind;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume:?}: {kind} volumes are not supported by the testbed's node")]
    Unsupported { volume: String, kind: String },
    #[error("volume {volume:?}: configmap {name:?} not found")]
    ConfigMapMissing { volume: String, name: String },
    #[error("volume {volume:?}: secret {name:?} not found")]
    SecretMissing { volume: String, name: String },
    #[error("volume {volume:?}: key {key:?} not found in {name:?}")]
    KeyMissing {
        volume: String,
        name: String,
        key: String,
    },
    #[error("volume {volume:?}: path {path:?} must be relative and must not contain '..'")]
    BadPath { volume: String, path: String },
    #[error("volume {volume:?}: cannot get a service account token: {source}")]
    Token { volume: String, source: kube::Error },
    #[error("volume {volume:?}: {source}")]
    Api { volume: String, source: kube::Error },
    #[error("volume {volume:?}: {reason}")]
    DownwardApi { volume: String, reason: String },
    #[error("volume {volume:?}: cannot write {path}: {source}")]
    Io {
        volume: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("container {container:?} mounts {volume:?}, which the pod does not define")]
    NoSuchVolume { container: String, volume: String },
}

/// A service-account token the node keeps fresh: the kubelet rewrites it at 80 % of its
/// lifetime, and so does [`PodVolumes::refresh_tokens`].
#[derive(Debug, Clone)]
struct TokenFile {
    volume: String,
    path: PathBuf,
    service_account: String,
    audience: Option<String>,
    expiration_seconds: i64,
    mode: u32,
}

/// The volumes of one pod, on the host.
#[derive(Debug)]
pub struct PodVolumes {
    paths: HashMap<String, PathBuf>,
    tokens: Vec<TokenFile>,
}

/// What making volumes needs from the node.
pub struct VolumeContext<'a> {
    pub client: &'a Client,
    pub pod: &'a Pod,
    /// `<pod dir>/volumes`.
    pub dir: &'a Path,
    pub env: &'a EnvContext<'a>,
}

impl PodVolumes {
    /// Makes every volume of the pod. Fails on the first one that cannot be made; the
    /// caller retries, as the kubelet does (`FailedMount`).
    pub async fn prepare(ctx: &VolumeContext<'_>) -> Result<Self, VolumeError> {
        let namespace = ctx.pod.metadata.namespace.clone().unwrap_or_default();
        let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
        let mut paths = HashMap::new();
        let mut tokens = Vec::new();
        let volumes = ctx.pod.spec.iter().flat_map(|s| s.volumes.iter().flatten());
        for volume in volumes {
            let name = volume.name.clone();
            let dir = ctx.dir.join(&name);
            let io = |path: &Path, source| VolumeError::Io {
                volume: name.clone(),
                path: path.to_owned(),
                source,
            };
            if let Some(host) = &volume.host_path {
                paths.insert(name.clone(), PathBuf::from(&host.path));
                continue;
            }
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            if volume.empty_dir.is_some() {
                // Nothing to fill: an empty directory that lives as long as the pod.
            } else if let Some(source) = &volume.config_map {
                let data = get_config_map(&config_maps, &name, &source.name).await?;
                match data {
                    Some(data) => write_items(
                        &name,
                        &dir,
                        &data,
                        source.items.as_deref(),
                        source.default_mode,
                    )?,
                    None if source.optional == Some(true) => {}
                    None => {
                        return Err(VolumeError::ConfigMapMissing {
                            volume: name,
                            name: source.name.clone(),
                        })
                    }
                }
            } else if let Some(source) = &volume.secret {
                let secret_name = source.secret_name.clone().unwrap_or_default();
                match get_secret(&secrets, &name, &secret_name).await? {
                    Some(data) => write_items(
                        &name,
                        &dir,
                        &data,
                        source.items.as_deref(),
                        source.default_mode,
                    )?,
                    None if source.optional == Some(true) => {}
                    None => {
                        return Err(VolumeError::SecretMissing {
                            volume: name,
                            name: secret_name,
                        })
                    }
                }
            } else if let Some(source) = &volume.downward_api {
                write_downward(
                    ctx,
                    &name,
                    &dir,
                    source.items.as_deref().unwrap_or(&[]),
                    source.default_mode,
                )?;
            } else if let Some(projected) = &volume.projected {
                let default_mode = projected.default_mode;
                for source in projected.sources.iter().flatten() {
                    if let Some(s) = &source.config_map {
                        match get_config_map(&config_maps, &name, &s.name).await? {
                            Some(data) => {
                                write_items(&name, &dir, &data, s.items.as_deref(), default_mode)?
                            }
                            None if s.optional == Some(true) => {}
                            None => {
                                return Err(VolumeError::ConfigMapMissing {
                                    volume: name,
                                    name: s.name.clone(),
                                })
                            }
                        }
                    } else if let Some(s) = &source.secret {
                        match get_secret(&secrets, &name, &s.name).await? {
                            Some(data) => {
                                write_items(&name, &dir, &data, s.items.as_deref(), default_mode)?
                            }
                            None if s.optional == Some(true) => {}
                            None => {
                                return Err(VolumeError::SecretMissing {
                                    volume: name,
                                    name: s.name.clone(),
                                })
                            }
                        }
                    } else if let Some(d) = &source.downward_api {
                        write_downward(
                            ctx,
                            &name,
                            &dir,
                            d.items.as_deref().unwrap_or(&[]),
                            default_mode,
                        )?;
                    } else if let Some(t) = &source.service_account_token {
                        let token = TokenFile {
                            volume: name.clone(),
                            path: dir.join(checked_path(&name, &t.path)?),
                            service_account: ctx
                                .pod
                                .spec
                                .as_ref()
                                .and_then(|s| s.service_account_name.clone())
                                .unwrap_or_else(|| "default".to_owned()),
                            audience: t.audience.clone().filter(|a| !a.is_empty()),
                            expiration_seconds: t.expiration_seconds.unwrap_or(3607).max(600),
                            mode: mode_of(default_mode, None),
                        };
                        write_token(ctx.client, ctx.pod, &token).await?;
                        tokens.push(token);
                    } else {
                        return Err(VolumeError::Unsupported {
                            volume: name,
                            kind: "this projected source".to_owned(),
                        });
                    }
                }
            } else {
                return Err(VolumeError::Unsupported {
                    volume: name,
                    kind: volume_kind(volume),
                });
            }
            paths.insert(name, dir);
        }
        Ok(Self { paths, tokens })
    }

    /// The bind mounts a container's `volumeMounts` ask for, `subPath` included.
    pub fn binds(&self, container: &Container) -> Result<Vec<Bind>, VolumeError> {
        let mut binds = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let source = self
                .paths
                .get(&mount.name)
                .ok_or_else(|| VolumeError::NoSuchVolume {
                    container: container.name.clone(),
                    volume: mount.name.clone(),
                })?;
            let source = match mount.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => {
                    let path = source.join(checked_path(&mount.name, sub)?);
                    if !path.exists() {
                        std::fs::create_dir_all(&path).map_err(|e| VolumeError::Io {
                            volume: mount.name.clone(),
                            path: path.clone(),
                            source: e,
                        })?;
                    }
                    path
                }
                _ => source.clone(),
            };
            binds.push(Bind {
                source,
                target: PathBuf::from(&mount.mount_path),
                read_only: mount.read_only == Some(true),
            });
        }
        Ok(binds)
    }

    /// Rewrites each token at 80 % of its lifetime, until the pod's task drops this.
    pub async fn refresh_tokens(&self, client: &Client, pod: &Pod) {
        let Some(shortest) = self.tokens.iter().map(|t| t.expiration_seconds).min() else {
            return std::future::pending().await;
        };
        let period = Duration::from_secs(u64::try_from(shortest * 8 / 10).unwrap_or(480));
        loop {
            tokio::time::sleep(period).await;
            for token in &self.tokens {
                if let Err(e) = write_token(client, pod, token).await {
                    tracing::warn!(error = %e, "cannot refresh a service account token");
                }
            }
        }
    }
}

async fn get_config_map(
    api: &Api<ConfigMap>,
    volume: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, VolumeError> {
    let found = api.get_opt(name).await.map_err(|source| VolumeError::Api {
        volume: volume.to_owned(),
        source,
    })?;
    Ok(found.map(|cm| {
        let mut data: BTreeMap<String, Vec<u8>> = cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        for (k, v) in cm.binary_data.unwrap_or_default() {
            data.insert(k, v.0);
        }
        data
    }))
}

async fn get_secret(
    api: &Api<Secret>,
    volume: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, VolumeError> {
    let found = api.get_opt(name).await.map_err(|source| VolumeError::Api {
        volume: volume.to_owned(),
        source,
    })?;
    Ok(found.map(|s| {
        let mut data: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        for (k, v) in s.string_data.unwrap_or_default() {
            data.insert(k, v.into_bytes());
        }
        data
    }))
}

/// Writes keys as files: all of them, or only `items` (each at its own `path`).
fn write_items(
    volume: &str,
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
) -> Result<(), VolumeError> {
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                let value = data.get(&item.key).ok_or_else(|| VolumeError::KeyMissing {
                    volume: volume.to_owned(),
                    name: volume.to_owned(),
                    key: item.key.clone(),
                })?;
                let path = dir.join(checked_path(volume, &item.path)?);
                write_file(volume, &path, value, mode_of(default_mode, item.mode))?;
            }
        }
        _ => {
            for (key, value) in data {
                let path = dir.join(checked_path(volume, key)?);
                write_file(volume, &path, value, mode_of(default_mode, None))?;
            }
        }
    }
    Ok(())
}

fn write_downward(
    ctx: &VolumeContext<'_>,
    volume: &str,
    dir: &Path,
    items: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
) -> Result<(), VolumeError> {
    for item in items {
        let value = if let Some(field) = &item.field_ref {
            downward_field(ctx.pod, &field.field_path).ok_or_else(|| VolumeError::DownwardApi {
                volume: volume.to_owned(),
                reason: format!("unsupported fieldRef {:?}", field.field_path),
            })?
        } else if let Some(r) = &item.resource_field_ref {
            let container = ctx
                .pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .find(|c| Some(c.name.as_str()) == r.container_name.as_deref());
            let divisor = r.divisor.as_ref().map_or("1", |q| q.0.as_str());
            env::resource_value(
                ctx.env,
                container.and_then(|c| c.resources.as_ref()),
                &r.resource,
                divisor,
            )
            .map_err(|reason| VolumeError::DownwardApi {
                volume: volume.to_owned(),
                reason,
            })?
        } else {
            String::new()
        };
        let path = dir.join(checked_path(volume, &item.path)?);
        write_file(
            volume,
            &path,
            value.as_bytes(),
            mode_of(default_mode, item.mode),
        )?;
    }
    Ok(())
}

/// The downward API's file form: label and annotation maps as `key="value"` lines.
fn downward_field(pod: &Pod, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let lines = |map: Option<&BTreeMap<String, String>>| {
        map.map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v:?}\n"))
                .collect::<String>()
        })
        .unwrap_or_default()
    };
    Some(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => lines(meta.labels.as_ref()),
        "metadata.annotations" => lines(meta.annotations.as_ref()),
        _ => {
            let key = |prefix: &str| {
                path.strip_prefix(prefix)?
                    .strip_prefix("['")?
                    .strip_suffix("']")
                    .map(str::to_owned)
            };
            if let Some(k) = key("metadata.labels") {
                meta.labels.as_ref()?.get(&k).cloned().unwrap_or_default()
            } else if let Some(k) = key("metadata.annotations") {
                meta.annotations
                    .as_ref()?
                    .get(&k)
                    .cloned()
                    .unwrap_or_default()
            } else {
                return None;
            }
        }
    })
}

async fn write_token(client: &Client, pod: &Pod, token: &TokenFile) -> Result<(), VolumeError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: token.audience.clone().map(|a| vec![a]),
            expiration_seconds: Some(token.expiration_seconds),
            // Bound to the pod: the token dies with it, as a kubelet's does.
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let answer = api
        .create_token_request(&token.service_account, &PostParams::default(), &request)
        .await
        .map_err(|source| VolumeError::Token {
            volume: token.volume.clone(),
            source,
        })?;
    let value = answer.status.and_then(|s| s.token).unwrap_or_default();
    write_file(&token.volume, &token.path, value.as_bytes(), token.mode)
}

/// Writes through a temporary file and a rename, so a reader never sees half a token.
fn write_file(volume: &str, path: &Path, data: &[u8], mode: u32) -> Result<(), VolumeError> {
    let io = |source| VolumeError::Io {
        volume: volume.to_owned(),
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("thaw-tmp");
    std::fs::write(&tmp, data).map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn mode_of(default_mode: Option<i32>, item_mode: Option<i32>) -> u32 {
    let mode = item_mode.or(default_mode).unwrap_or(0o644);
    u32::try_from(mode).unwrap_or(0o644) & 0o777
}

/// A key or `path` from the API, which must stay inside the volume.
fn checked_path(volume: &str, path: &str) -> Result<PathBuf, VolumeError> {
    let p = Path::new(path);
    let ok = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(p.to_owned())
    } else {
        Err(VolumeError::BadPath {
            volume: volume.to_owned(),
            path: path.to_owned(),
        })
    }
}

fn volume_kind(volume: &k8s_openapi::api::core::v1::Volume) -> String {
    serde_json::to_value(volume)
        .ok()
        .and_then(|v| {
            v.as_object()?
                .keys()
                .find(|k| k.as_str() != "name")
                .cloned()
        })
        .unwrap_or_else(|| "empty".to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_volume() {
        assert!(checked_path("v", "a/b.txt").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert!(checked_path("v", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn items_pick_keys_paths_and_modes() {
        let dir = std::env::temp_dir().join(format!("thaw-vol-{}", std::process::id()));
        let data = BTreeMap::from([
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), b"2".to_vec()),
        ]);
        write_items("v", &dir.join("all"), &data, None, Some(0o600)).unwrap();
        assert_eq!(std::fs::read(dir.join("all/a")).unwrap(), b"1");
        let mode = std::fs::metadata(dir.join("all/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let items = [KeyToPath {
            key: "b".to_owned(),
            path: "sub/renamed".to_owned(),
            mode: Some(0o400),
            ..KeyToPath::default()
        }];
        write_items("v", &dir.join("some"), &data, Some(&items), None).unwrap();
        assert_eq!(std::fs::read(dir.join("some/sub/renamed")).unwrap(), b"2");
        assert!(!dir.join("some/a").exists());
        let missing = [KeyToPath {
            key: "zzz".to_owned(),
            path: "z".to_owned(),
            mode: None,
            ..KeyToPath::default()
        }];
        let err = write_items("v", &dir.join("x"), &data, Some(&missing), None).unwrap_err();
        assert!(err.to_string().contains("key \"zzz\""), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn downward_files_render_maps_as_lines() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "labels": {"app": "web", "tier": "a"}}
        }))
        .unwrap();
        assert_eq!(
            downward_field(&pod, "metadata.labels").unwrap(),
            "app=\"web\"\ntier=\"a\"\n"
        );
        assert_eq!(
            downward_field(&pod, "metadata.labels['app']").unwrap(),
            "web"
        );
        assert!(downward_field(&pod, "spec.nodeName").is_none());
    }
}
