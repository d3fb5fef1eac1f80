//! The testbed's image map: there is no registry and no container runtime, so an image
//! name stands for an executable on this machine. The map is a small text file, one
//! `image<TAB>executable` line each, read again at every container start so that a test
//! or `knative.sh` can add images to a running node.

use std::path::{Path, PathBuf};

/// Why an image cannot be run. The message becomes the container's `ErrImagePull` text.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read the image map {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected `image<TAB>executable`, got {text:?}")]
    Syntax {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("image {image:?} is not in the testbed's image map {path} (it has: {known})")]
    Unknown {
        image: String,
        path: PathBuf,
        known: String,
    },
    #[error("image {image:?} maps to {executable}, which is not an executable file")]
    Missing { image: String, executable: PathBuf },
}

/// The image map file.
#[derive(Debug, Clone)]
pub struct ImageMap {
    path: PathBuf,
}

impl ImageMap {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The executable standing for `image`, whatever its tag or digest.
    pub fn resolve(&self, image: &str) -> Result<PathBuf, ImageError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| ImageError::Read {
            path: self.path.clone(),
            source,
        })?;
        let entries = parse(&text, &self.path)?;
        let wanted = repository(image);
        let Some((_, executable)) = entries.iter().find(|(name, _)| repository(name) == wanted)
        else {
            let known = entries
                .iter()
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ImageError::Unknown {
                image: image.to_owned(),
                path: self.path.clone(),
                known,
            });
        };
        if !is_executable(executable) {
            return Err(ImageError::Missing {
                image: image.to_owned(),
                executable: executable.clone(),
            });
        }
        Ok(executable.clone())
    }
}

fn parse(text: &str, path: &Path) -> Result<Vec<(String, PathBuf)>, ImageError> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next(), fields.next()) {
            (Some(image), Some(executable), None) => {
                entries.push((image.to_owned(), PathBuf::from(executable)))
            }
            _ => {
                return Err(ImageError::Syntax {
                    path: path.to_owned(),
                    line: i + 1,
                    text: line.to_owned(),
                })
            }
        }
    }
    Ok(entries)
}

/// An image reference without its tag or digest: `thaw.local/testapp:v1@sha256:…` →
/// `thaw.local/testapp`. A colon before the last `/` belongs to a registry's port.
pub fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    let name_start = image.rfind('/').map_or(0, |i| i + 1);
    match image[name_start..].find(':') {
        Some(colon) => &image[..name_start + colon],
        None => image,
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_digests_are_ignored() {
        assert_eq!(repository("thaw.local/testapp"), "thaw.local/testapp");
        assert_eq!(repository("thaw.local/testapp:v1"), "thaw.local/testapp");
        assert_eq!(
            repository("thaw.local/testapp@sha256:abcd"),
            "thaw.local/testapp"
        );
        assert_eq!(
            repository("registry:5000/thaw/queue-proxy:latest@sha256:0"),
            "registry:5000/thaw/queue-proxy"
        );
        assert_eq!(repository("registry:5000/app"), "registry:5000/app");
    }

    #[test]
    fn resolves_known_images_and_names_unknown_ones() {
        let dir = std::env::temp_dir().join(format!("thaw-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let map = dir.join("images.tsv");
        std::fs::write(
            &map,
            "# comment\nthaw.local/sh\t/bin/sh\nthaw.local/gone\t/nonexistent/x\n",
        )
        .unwrap();
        let images = ImageMap::new(&map);
        assert_eq!(
            images.resolve("thaw.local/sh:1.2").unwrap(),
            PathBuf::from("/bin/sh")
        );
        let err = images.resolve("docker.io/nginx:1").unwrap_err().to_string();
        assert!(err.contains("\"docker.io/nginx:1\" is not in"), "{err}");
        assert!(err.contains("thaw.local/sh, thaw.local/gone"), "{err}");
        let err = images.resolve("thaw.local/gone").unwrap_err().to_string();
        assert!(err.contains("not an executable file"), "{err}");
        std::fs::write(&map, "thaw.local/sh\n").unwrap();
        let err = images.resolve("thaw.local/sh").unwrap_err().to_string();
        assert!(err.contains("images.tsv:1: expected"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
