use std::fmt;

/// A Consul release, from `/v1/agent/self` `.Config.Version` (e.g. `1.8.7`, `1.16.0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConsulVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl ConsulVersion {
    /// Accepts `1.8.7`, `v1.9.0`, `1.16.0+ent`, `1.9.0-beta1`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().trim_start_matches('v');
        let core = text.split(['-', '+', ' ']).next()?;
        let mut parts = core.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().map(|p| p.parse().ok()).unwrap_or(Some(0))?;
        Some(ConsulVersion {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for ConsulVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Which intentions API to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiFlavor {
    /// < 1.9: ID-based `/v1/connect/intentions`, L4 only; unknown JSON fields are rejected.
    Legacy,
    /// 1.9+: one `service-intentions` config entry per destination, edited with `?cas=`.
    Modern,
}

impl ApiFlavor {
    pub fn for_version(version: ConsulVersion) -> Self {
        if (version.major, version.minor) >= (1, 9) {
            ApiFlavor::Modern
        } else {
            ApiFlavor::Legacy
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_pick_the_api() {
        let v = ConsulVersion::parse("1.8.7").unwrap();
        assert_eq!(
            v,
            ConsulVersion {
                major: 1,
                minor: 8,
                patch: 7
            }
        );
        assert_eq!(ApiFlavor::for_version(v), ApiFlavor::Legacy);
        assert_eq!(
            ApiFlavor::for_version(ConsulVersion::parse("1.9.0-beta1").unwrap()),
            ApiFlavor::Modern
        );
        assert_eq!(
            ApiFlavor::for_version(ConsulVersion::parse("v1.16.0+ent").unwrap()),
            ApiFlavor::Modern
        );
        assert_eq!(
            ApiFlavor::for_version(ConsulVersion::parse("2.0").unwrap()),
            ApiFlavor::Modern
        );
        assert!(ConsulVersion::parse("garbage").is_none());
    }
}
