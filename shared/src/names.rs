//! Kubernetes names, checked where config names a revision or namespace, so that every
//! platform's names would also be valid on a cluster (and in a `Host`).

/// RFC 1123 label (namespaces): 1-63 of `a-z`, `0-9`, `-`, not starting or ending in `-`.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1035 label (Services, and so revisions): an RFC 1123 label starting with a letter.
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

/// A host name as `Host` carries it, without port or scheme: dot-separated labels of
/// 1-63 ASCII letters, digits and `-`, 253 bytes at most. Declared hosts are checked with
/// this wherever config gives them (annotations, the local YAML), because the activator
/// looks a request up by its `Host` with the port removed: anything else could never be
/// routed.
pub fn is_host(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for good in [
            "hello.local",
            "Hello.Example.com",
            "localhost",
            "10.0.0.1",
            "a-b.c",
        ] {
            assert!(is_host(good), "{good}");
        }
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "a.local:80",
            "[::1]",
            "::1",
            "héllo",
            "a b",
            "a_b",
        ] {
            assert!(!is_host(bad), "{bad}");
        }
        assert!(!is_host(&format!("{}.a", "a".repeat(64))));
        assert!(!is_host(&["a"; 128].join(".")));
    }

    #[test]
    fn labels() {
        for good in ["a", "hello-00001", "a1", &"a".repeat(63)] {
            assert!(is_dns1035_label(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "hello world",
            &"a".repeat(64),
            "é",
        ] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
        assert!(is_dns1123_label("1abc"));
        assert!(!is_dns1035_label("1abc"));
    }
}
