//! `REGISTRY/REPO[:TAG][@sha256:DIGEST]` references.

/// A parsed registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// `path/of/repo` (lowercase components).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    /// Whether `s` looks like a registry reference rather than a local snapshot name (a
    /// store name never holds '/').
    pub fn looks_like(s: &str) -> bool {
        s.contains('/')
    }

    /// Parses `REGISTRY/REPO[:TAG][@DIGEST]`; the registry part is required (it holds a
    /// '.' or ':' or is `localhost`). The error says what is wrong.
    pub fn parse(s: &str) -> Result<Reference, String> {
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| format!("{s}: the digest must be sha256:<64 hex digits>"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("{s}: the digest must be sha256:<64 hex digits>"));
                }
                (r, Some(d.to_ascii_lowercase()))
            }
            None => (s, None),
        };
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("{s}: expected REGISTRY/REPOSITORY[:TAG]"))?;
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(format!(
                "{s}: `{registry}` is not a registry host (HOST[:PORT], e.g. \
                 registry.example.com or 127.0.0.1:5000)"
            ));
        }
        let (repo, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_owned())),
            _ => (path, None),
        };
        if repo.is_empty()
            || !repo.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'.' | b'_' | b'-')
                    })
            })
        {
            return Err(format!(
                "{s}: the repository `{repo}` must be lowercase path components of a-z 0-9 . _ -"
            ));
        }
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                return Err(format!(
                    "{s}: the tag `{t}` must be 1-128 of A-Z a-z 0-9 . _ -"
                ));
            }
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Reference {
            registry: registry.to_owned(),
            repository: repo.to_owned(),
            tag,
            digest,
        })
    }

    /// The host without its port.
    pub fn host(&self) -> &str {
        if self.registry.starts_with('[') {
            return self
                .registry
                .split_once(']')
                .map_or(&self.registry[..], |(h, _)| &h[1..]);
        }
        self.registry
            .rsplit_once(':')
            .map_or(&self.registry[..], |(h, _)| h)
    }

    /// What to ask the registry for: the digest if given, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// A store name for the pulled snapshot: the repository's last component and the
    /// tag (`app-v1`).
    pub fn local_name(&self) -> String {
        let last = self.repository.rsplit('/').next().unwrap_or("snapshot");
        match &self.tag {
            Some(t) => format!("{last}-{t}"),
            None => last.to_owned(),
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let r = Reference::parse("127.0.0.1:5000/apps/py:v1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "apps/py");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.host(), "127.0.0.1");
        assert_eq!(r.local_name(), "py-v1");
        let r = Reference::parse("localhost/app").unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert!(Reference::parse("app:v1").is_err());
        assert!(Reference::parse("docker/app").is_err());
        assert!(Reference::parse("r.io/App").is_err());
        assert!(Reference::parse("r.io/a@sha256:12").is_err());
        let d = format!("r.io/a@sha256:{}", "a".repeat(64));
        assert_eq!(Reference::parse(&d).unwrap().manifest_ref().len(), 71);
    }
}
