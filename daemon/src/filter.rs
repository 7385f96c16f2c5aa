//! Which events a sink receives: globs on type names plus optional matches on the type's category, scope and
//! severity. Filters depend only on an event's type, so they are evaluated once per type, not once per event.
//!
//! Flipt's `noun:verb` filters are written on dotted type names: `project:*` is the same as `project.*` (every
//! verb of the noun `project`) and `*:deleted` the same as `*.deleted`.

use serde::Deserialize;

use crate::event_types::{EventType, Severity};

/// The `events` section of a sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Glob patterns on type names (`*` any run of characters, `?` one); a leading `!` excludes. Default `["*"]`.
    #[serde(default = "everything")]
    pub types: Vec<String>,
    /// The type's `feature_category` must be one of these.
    #[serde(default)]
    pub feature_categories: Option<Vec<String>>,
    /// The type's `scope` must include one of these.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// The type's severity must be one of these.
    #[serde(default)]
    pub severities: Option<Vec<Severity>>,
    /// The type's severity must be at least this.
    #[serde(default)]
    pub min_severity: Option<Severity>,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            types: everything(),
            feature_categories: None,
            scopes: None,
            severities: None,
            min_severity: None,
        }
    }
}

fn everything() -> Vec<String> {
    vec!["*".into()]
}

/// A checked filter.
#[derive(Debug, Clone)]
pub struct Filter {
    include: Vec<String>,
    exclude: Vec<String>,
    config: FilterConfig,
}

impl Filter {
    /// Checks a filter's patterns.
    pub fn new(config: &FilterConfig) -> Result<Filter, String> {
        let mut include = Vec::new();
        let mut exclude = Vec::new();
        for pattern in &config.types {
            let (list, p) = match pattern.strip_prefix('!') {
                Some(p) => (&mut exclude, p),
                None => (&mut include, pattern.as_str()),
            };
            if p.is_empty() {
                return Err(format!("types: {pattern:?} is an empty pattern"));
            }
            if let Some(bad) = p
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '*' | '?')))
            {
                return Err(format!(
                    "types: {pattern:?} contains {bad:?}; patterns use type-name characters, '*', '?' and ':'"
                ));
            }
            list.push(p.replace(':', "."));
        }
        if include.is_empty() {
            return Err("types: no pattern includes anything; add e.g. \"*\"".into());
        }
        Ok(Filter {
            include,
            exclude,
            config: config.clone(),
        })
    }

    /// Whether events of type `ty` go to the sink.
    pub fn matches(&self, ty: &EventType) -> bool {
        let name = ty.name.as_str();
        let c = &self.config;
        self.include.iter().any(|p| glob(p, name))
            && !self.exclude.iter().any(|p| glob(p, name))
            && c.feature_categories.as_ref().is_none_or(|cats| {
                ty.feature_category
                    .as_ref()
                    .is_some_and(|f| cats.contains(f))
            })
            && c.scopes
                .as_ref()
                .is_none_or(|scopes| ty.scope.iter().any(|s| scopes.contains(s)))
            && c.severities
                .as_ref()
                .is_none_or(|sev| sev.contains(&ty.severity))
            && c.min_severity.is_none_or(|min| ty.severity >= min)
    }
}

/// Matches `text` against a glob with `*` and `?`.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_types::Registry;
    use std::path::PathBuf;

    #[test]
    fn globs() {
        let check = |p: &str, t: &str, expected: bool| assert_eq!(glob(p, t), expected, "{p} {t}");
        check("*", "user_login", true);
        check("*", "", true);
        check("user_*", "user_login", true);
        check("user_*", "users", false);
        check("*.deleted", "project.deleted", true);
        check("*.deleted", "project.deleted.x", false);
        check("*_deleted", "project_deleted", true);
        check("u?er_login", "user_login", true);
        check("a*b*c", "aXXbYYc", true);
        check("a*b*c", "aXXbYY", false);
        check("user_login", "user_login", true);
        check("user_login", "user_logins", false);
    }

    fn registry() -> Registry {
        let def = |name: &str, extra: &str| {
            (
                PathBuf::from(format!("{name}.yml")),
                format!(
                    "name: {name}\ndescription: d\nsaved_to_database: true\nstreamed: true\n{extra}"
                ),
            )
        };
        Registry::from_sources(vec![
            def(
                "user_login",
                "feature_category: authentication\nscope: [User]\n",
            ),
            def("project.deleted", "scope: [Project]\nseverity: warning\n"),
            def(
                "project.created",
                "scope: [Project, Group]\nseverity: notice\n",
            ),
            def("flag.deleted", "severity: critical\n"),
        ])
        .unwrap()
    }

    fn matching(yaml: &str) -> Vec<String> {
        let config: FilterConfig = serde_saphyr::from_str(yaml).unwrap();
        let filter = Filter::new(&config).unwrap();
        registry()
            .types()
            .into_iter()
            .filter(|t| filter.matches(t))
            .map(|t| t.name.clone())
            .collect()
    }

    #[test]
    fn filters() {
        let check = |yaml: &str, expected: &[&str]| assert_eq!(matching(yaml), expected, "{yaml}");
        check(
            "{}",
            &[
                "flag.deleted",
                "project.created",
                "project.deleted",
                "user_login",
            ],
        );
        check("types: ['*.deleted']", &["flag.deleted", "project.deleted"]);
        check("types: ['*:deleted']", &["flag.deleted", "project.deleted"]);
        check(
            "types: ['project:*']",
            &["project.created", "project.deleted"],
        );
        check(
            "types: ['*', '!project.*']",
            &["flag.deleted", "user_login"],
        );
        check("feature_categories: [authentication]", &["user_login"]);
        check("scopes: [Group, User]", &["project.created", "user_login"]);
        check(
            "min_severity: warning",
            &["flag.deleted", "project.deleted"],
        );
        check("severities: [notice]", &["project.created"]);
        check(
            "{types: ['project.*'], min_severity: warning}",
            &["project.deleted"],
        );
    }

    #[test]
    fn bad_filters_are_explained() {
        let check = |yaml: &str, expected: &str| {
            let config: FilterConfig = serde_saphyr::from_str(yaml).unwrap();
            let err = Filter::new(&config).unwrap_err();
            assert!(err.contains(expected), "{yaml}: {err}");
        };
        check("types: []", "no pattern includes");
        check("types: ['!user_*']", "no pattern includes");
        check("types: ['user login']", "contains ' '");
        check("types: ['']", "empty pattern");
    }
}
