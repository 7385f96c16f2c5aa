//! The event-type registry: one YAML definition per type, checked against `schemas/event-type.schema.json`.
//!
//! Owns loading, checking and looking up definitions. Loading reports every problem of every file at once, each
//! with its file and JSON path; a registry exists only when the whole set is valid, so the daemon never runs on
//! half a set.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Deserialize;
use serde_json::Value;

use crate::protocol::{Payload, Violation, instance};

/// The daemon's own event types, embedded so that they exist whatever the configured directory holds (a file of
/// the same name in the directory takes precedence).
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "trail_plugin_loaded.yml",
        include_str!("../../event-types/trail_plugin_loaded.yml"),
    ),
    (
        "trail_plugin_reloaded.yml",
        include_str!("../../event-types/trail_plugin_reloaded.yml"),
    ),
    (
        "trail_plugin_failed.yml",
        include_str!("../../event-types/trail_plugin_failed.yml"),
    ),
    (
        "trail_plugin_refused.yml",
        include_str!("../../event-types/trail_plugin_refused.yml"),
    ),
    (
        "trail_sink_events_dropped.yml",
        include_str!("../../event-types/trail_sink_events_dropped.yml"),
    ),
    (
        "trail_log_file_deleted.yml",
        include_str!("../../event-types/trail_log_file_deleted.yml"),
    ),
    (
        "trail_started.yml",
        include_str!("../../event-types/trail_started.yml"),
    ),
    (
        "trail_log_tampered.yml",
        include_str!("../../event-types/trail_log_tampered.yml"),
    ),
    (
        "trail_checkpoint.yml",
        include_str!("../../event-types/trail_checkpoint.yml"),
    ),
    (
        "trail_config_reloaded.yml",
        include_str!("../../event-types/trail_config_reloaded.yml"),
    ),
    (
        "trail_submission_denied.yml",
        include_str!("../../event-types/trail_submission_denied.yml"),
    ),
];

/// Event types whose names start with this are the daemon's own: only the daemon records them (with the marker
/// `"daemon":true` in `source`, which no client's record can carry), a client submitting one is refused
/// (`forbidden`), and a definition file may use such a name only for one of [`BUILTIN`]'s types.
pub const DAEMON_PREFIX: &str = "trail_";

/// Whether `name` is reserved for the daemon's own events (see [`DAEMON_PREFIX`]).
pub fn is_daemon_type(name: &str) -> bool {
    name.starts_with(DAEMON_PREFIX)
}

/// The JSON Schema every definition file must satisfy.
pub const DEFINITION_SCHEMA: &str = include_str!("../../schemas/event-type.schema.json");

/// How much an event matters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Routine activity.
    #[default]
    Info,
    /// Normal but significant.
    Notice,
    /// Needs a look.
    Warning,
    /// Needs action now.
    Critical,
}

impl Severity {
    /// The name used in definitions and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Notice => "notice",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One validated event type.
#[derive(Debug)]
pub struct EventType {
    /// Unique name; equals the definition file's base name.
    pub name: String,
    /// What triggers it.
    pub description: String,
    /// Events are written to the JSON-lines log.
    pub saved_to_database: bool,
    /// Events are routed to sinks.
    pub streamed: bool,
    /// Product area, for sink filters.
    pub feature_category: Option<String>,
    /// Entities the event can belong to, for sink filters.
    pub scope: Vec<String>,
    /// Short unique code such as `T1000I`.
    pub code: Option<String>,
    /// How much it matters.
    pub severity: Severity,
    /// Version of the definition.
    pub version: u32,
    /// Where the definition came from.
    pub file: PathBuf,
    /// SHA-256 of the definition's text: a reload tells a changed definition by it.
    pub digest: [u8; 32],
    /// Events of this type stored since the daemon started (counted by `ingest` once their group is durable).
    /// Shared by every definition of the same name this process loads, so it keeps counting across reloads;
    /// [`accepted_counts`] reads them all.
    pub accepted: Arc<AtomicU64>,
    /// An event of this type without `actor.id` is refused (`invalid_event`, naming `/actor/id`).
    pub require_actor: bool,
    /// The peer's user name is stamped as `actor.id`; an event bringing another `actor.id` is refused
    /// (`forbidden`). See [`crate::access`].
    pub actor_from_peer: bool,
    payload: Option<jsonschema::Validator<instance::Tape>>,
}

/// The counter of stored events of every type name this process has loaded, created with the first definition
/// of each name. Bounded by the definitions loaded, never by what clients send.
static ACCEPTED: Mutex<BTreeMap<String, Arc<AtomicU64>>> = Mutex::new(BTreeMap::new());

/// The counter of stored events of type `name` (see [`EventType::accepted`]).
fn accepted_counter(name: &str) -> Arc<AtomicU64> {
    ACCEPTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name.to_owned())
        .or_default()
        .clone()
}

/// Events stored since start, per event type name, for every type loaded since start (also types a reload
/// removed since), by name.
pub fn accepted_counts() -> Vec<(String, u64)> {
    ACCEPTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(name, n)| (name.clone(), n.load(Ordering::Relaxed)))
        .collect()
}

impl EventType {
    /// Checks a payload against the type's schema; every violation is returned, with paths under `/payload`.
    ///
    /// The schema sees numbers as 64-bit floats (the nearest one; beyond `±1.7976931348623157e308`, that bound),
    /// the stored record the digits as written. The payload was read in place when the request was parsed
    /// ([`instance`]), not into a `Value`.
    pub fn check_payload(&self, payload: &Payload<'_>) -> Result<(), Vec<Violation>> {
        let Some(validator) = &self.payload else {
            return Ok(());
        };
        let doc = payload.doc().map_err(|e| {
            vec![Violation {
                path: "/payload".into(),
                message: format!("cannot be read for the schema check: {e}"),
            }]
        })?;
        if validator.is_valid(doc.root()) {
            return Ok(());
        }
        Err(validator
            .iter_errors(doc.root())
            .map(|e| Violation {
                path: format!("/payload{}", e.instance_path()),
                message: e.to_string(),
            })
            .collect())
    }
}

/// The loaded set of event types.
#[derive(Debug, Default)]
pub struct Registry {
    by_name: HashMap<String, Arc<EventType>>,
}

impl Registry {
    /// Loads every `*.yml` / `*.yaml` file of `dir`; other files are ignored.
    pub fn load_dir(dir: &Path) -> Result<Registry, Problems> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Problems(vec![Problem::new(
                dir,
                "",
                format!("cannot read event-type directory: {e}"),
            )])
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml"))
                    && !p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        files.sort();
        let mut sources = Vec::with_capacity(files.len());
        let mut problems = Vec::new();
        for (name, text) in BUILTIN {
            let stem = name.trim_end_matches(".yml");
            let defined = files
                .iter()
                .any(|f| f.file_stem().and_then(|s| s.to_str()) == Some(stem));
            if !defined {
                sources.push((
                    PathBuf::from(format!("(built in)/{name}")),
                    text.to_string(),
                ));
            }
        }
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => sources.push((file, text)),
                Err(e) => problems.push(Problem::new(&file, "", format!("cannot read: {e}"))),
            }
        }
        match Registry::from_sources(sources) {
            Ok(r) if problems.is_empty() => Ok(r),
            Ok(_) => Err(Problems(problems)),
            Err(Problems(more)) => {
                problems.extend(more);
                Err(Problems(problems))
            }
        }
    }

    /// Builds a registry from `(file, text)` pairs; the file names matter (a type's name must equal its base name).
    pub fn from_sources(sources: Vec<(PathBuf, String)>) -> Result<Registry, Problems> {
        let mut problems = Vec::new();
        let mut by_name: HashMap<String, Arc<EventType>> = HashMap::new();
        let mut codes: HashMap<String, PathBuf> = HashMap::new();
        for (file, text) in sources {
            let Some(ty) = parse_definition(&file, &text, &mut problems) else {
                continue;
            };
            if let Some(code) = &ty.code {
                if let Some(first) = codes.get(code) {
                    problems.push(Problem::new(
                        &file,
                        "/code",
                        format!(
                            "code {code:?} is already used by {}; codes must be unique",
                            first.display()
                        ),
                    ));
                    continue;
                }
                codes.insert(code.clone(), file.clone());
            }
            if let Some(first) = by_name.get(&ty.name) {
                problems.push(Problem::new(
                    &file,
                    "/name",
                    format!(
                        "event type {:?} is already defined in {}",
                        ty.name,
                        first.file.display()
                    ),
                ));
                continue;
            }
            by_name.insert(ty.name.clone(), Arc::new(ty));
        }
        if problems.is_empty() {
            Ok(Registry { by_name })
        } else {
            Err(Problems(problems))
        }
    }

    /// The type called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<EventType>> {
        self.by_name.get(name)
    }

    /// Number of types.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// True when no type is defined.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// All types, sorted by name.
    pub fn types(&self) -> Vec<&Arc<EventType>> {
        let mut v: Vec<_> = self.by_name.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// The fields of a definition file, after it satisfied the definition schema.
#[derive(Deserialize)]
struct Definition {
    name: String,
    description: String,
    saved_to_database: bool,
    streamed: bool,
    #[serde(default)]
    feature_category: Option<String>,
    #[serde(default)]
    scope: Vec<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    severity: Severity,
    #[serde(default = "one")]
    version: u32,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    require_actor: bool,
    #[serde(default)]
    actor_from_peer: bool,
}

fn one() -> u32 {
    1
}

fn definition_validator() -> &'static jsonschema::Validator {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    V.get_or_init(|| {
        let schema: Value =
            serde_json::from_str(DEFINITION_SCHEMA).expect("embedded definition schema is JSON");
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("embedded definition schema compiles")
    })
}

/// Compiles a payload schema the way the daemon uses it: draft 2020-12, formats checked, unknown formats refused.
/// An error is a JSON pointer into the schema (possibly empty) and a message.
pub fn compile_payload_schema(
    schema: &Value,
) -> Result<jsonschema::Validator<instance::Tape>, (String, String)> {
    jsonschema::options_for::<instance::Tape>()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .build(schema)
        .map_err(|e| {
            let message = e
                .to_string()
                .replace(". Adjust configuration to ignore unrecognized formats", "");
            (e.instance_path().to_string(), message)
        })
}

fn parse_definition(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Option<EventType> {
    let doc: Value = match serde_saphyr::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let message = e
                .to_string()
                .replace(", set DuplicateKeyPolicy in Options if acceptable", "")
                .replace("<input>", &file.display().to_string());
            problems.push(Problem::new(file, "", format!("invalid YAML: {message}")));
            return None;
        }
    };
    let before = problems.len();
    for e in definition_validator().iter_errors(&doc) {
        problems.push(Problem::new(
            file,
            &e.instance_path().to_string(),
            e.to_string(),
        ));
    }
    if problems.len() > before {
        return None;
    }
    let def: Definition = match serde_json::from_value(doc) {
        Ok(d) => d,
        Err(e) => {
            problems.push(Problem::new(file, "", e.to_string()));
            return None;
        }
    };
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if def.name != stem {
        problems.push(Problem::new(
            file,
            "/name",
            format!(
                "name {:?} does not match the file name; rename the file to {}.yml or the type to {stem:?}",
                def.name, def.name
            ),
        ));
    }
    let builtin = |name: &str| {
        BUILTIN
            .iter()
            .any(|(f, _)| f.strip_suffix(".yml") == Some(name))
    };
    if is_daemon_type(&def.name) && !builtin(&def.name) {
        let own: Vec<&str> = BUILTIN
            .iter()
            .filter_map(|(f, _)| f.strip_suffix(".yml"))
            .collect();
        problems.push(Problem::new(
            file,
            "/name",
            format!(
                "names starting with {DAEMON_PREFIX:?} are reserved for the daemon's own event types ({}); \
                 rename the type",
                own.join(", ")
            ),
        ));
    }
    if !def.saved_to_database && !def.streamed {
        problems.push(Problem::new(
            file,
            "",
            "saved_to_database and streamed are both false, so events would go nowhere; set one of them to true",
        ));
    }
    let payload = match &def.payload {
        None => None,
        Some(schema) => match compile_payload_schema(schema) {
            Ok(v) => Some(v),
            Err((at, message)) => {
                problems.push(Problem::new(file, &format!("/payload{at}"), message));
                None
            }
        },
    };
    if problems.len() > before {
        return None;
    }
    Some(EventType {
        accepted: accepted_counter(&def.name),
        name: def.name,
        description: def.description,
        saved_to_database: def.saved_to_database,
        streamed: def.streamed,
        feature_category: def.feature_category,
        scope: def.scope,
        code: def.code,
        severity: def.severity,
        version: def.version,
        file: file.to_owned(),
        digest: {
            use sha2::Digest;
            sha2::Sha256::digest(text.as_bytes()).into()
        },
        require_actor: def.require_actor,
        actor_from_peer: def.actor_from_peer,
        payload,
    })
}

/// One problem in one definition file.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The definition file (or the directory, when it cannot be read).
    pub file: PathBuf,
    /// JSON pointer into the definition, empty for the whole file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    fn new(file: &Path, path: &str, message: impl Into<String>) -> Problem {
        Problem {
            file: file.to_owned(),
            path: path.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.path,
                self.message
            )
        }
    }
}

/// Every problem found in a set of definitions.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} problem(s) in event types:", self.0.len())?;
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name: user_login\ndescription: a user signed in\nsaved_to_database: true\nstreamed: false\n";

    fn load(files: &[(&str, &str)]) -> Result<Registry, Problems> {
        Registry::from_sources(
            files
                .iter()
                .map(|(f, t)| (PathBuf::from(f), t.to_string()))
                .collect(),
        )
    }

    /// Loads one file called `<name>.yml` and returns the problems, one string each.
    fn problems(file: &str, text: &str) -> Vec<String> {
        match load(&[(file, text)]) {
            Ok(_) => vec![],
            Err(p) => p.0.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// Every expected fragment must appear in its own problem, and there must be no other problem.
    fn check(file: &str, text: &str, expected: &[&str]) {
        let got = problems(file, text);
        assert_eq!(got.len(), expected.len(), "{got:#?}");
        for e in expected {
            assert!(
                got.iter().any(|g| g.contains(e)),
                "expected {e:?} in {got:#?}"
            );
        }
    }

    #[test]
    fn definitions() {
        check("user_login.yml", GOOD, &[]);
        check(
            "other.yml",
            GOOD,
            &["other.yml: /name: name \"user_login\" does not match"],
        );
        check(
            "user_login.yml",
            "name: user_login\ndescription: x\nsaved_to_database: false\nstreamed: false\n",
            &["both false"],
        );
        check(
            "trail_backup_done.yml",
            "name: trail_backup_done\ndescription: x\nsaved_to_database: true\nstreamed: false\n",
            &[
                "trail_backup_done.yml: /name: names starting with \"trail_\" are reserved for the daemon's own",
            ],
        );
        check(
            "trail_plugin_failed.yml",
            "name: trail_plugin_failed\ndescription: x\nsaved_to_database: true\nstreamed: false\n",
            &[],
        );
        check(
            "user_login.yml",
            "name: [unclosed\n",
            &["user_login.yml: invalid YAML: error: line 1"],
        );
        check(
            "user_login.yml",
            &format!("{GOOD}name: again\n"),
            &["invalid YAML: error: line 5 column 1: duplicate mapping key: name"],
        );
        check(
            "user_login.yml",
            &format!("{GOOD}colour: blue\n"),
            &["colour"],
        );
        check(
            "user_login.yml",
            "name: user_login\nsaved_to_database: yes-ish\nstreamed: false\n",
            &[
                "/saved_to_database: \"yes-ish\" is not of type \"boolean\"",
                "user_login.yml: \"description\" is a required property",
            ],
        );
        check(
            "user_login.yml",
            &format!("{GOOD}severity: loud\n"),
            &["/severity"],
        );
        check(
            "user_login.yml",
            &format!("{GOOD}code: t1000i\n"),
            &["/code"],
        );
        check(
            "user_login.yml",
            &format!(
                "{GOOD}payload:\n  type: object\n  properties:\n    ip: {{type: string, format: ipv5}}\n"
            ),
            &["user_login.yml: /payload/properties/ip/format: Unknown format: 'ipv5'"],
        );
        check(
            "user_login.yml",
            &format!("{GOOD}payload: {{type: objekt}}\n"),
            &["user_login.yml: /payload/type: \"objekt\" is not valid"],
        );
        check(
            "user_login.yml",
            &format!("{GOOD}payload: {{$ref: \"https://example.com/s.json\"}}\n"),
            &["/payload"],
        );
    }

    #[test]
    fn yaml_errors_carry_a_line() {
        let got = problems("user_login.yml", "name: user_login\ndescription: [\n");
        assert!(got[0].contains("line"), "{got:?}");
    }

    #[test]
    fn every_problem_of_every_file_is_reported() {
        let err = load(&[
            (
                "a.yml",
                "name: b\ndescription: x\nsaved_to_database: true\nstreamed: true\n",
            ),
            ("c.yml", "name: c\nsaved_to_database: 3\nstreamed: true\n"),
            (
                "d.yml",
                "name: d\ndescription: x\nsaved_to_database: true\nstreamed: true\ncode: T1I\n",
            ),
            (
                "e.yml",
                "name: e\ndescription: x\nsaved_to_database: true\nstreamed: true\ncode: T1000I\n",
            ),
            (
                "f.yml",
                "name: f\ndescription: x\nsaved_to_database: true\nstreamed: true\ncode: T1000I\n",
            ),
        ])
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 5, "{text}");
        for needle in [
            "a.yml: /name",
            "c.yml: /saved_to_database",
            "c.yml: \"description\" is a required property",
            "d.yml: /code",
            "f.yml: /code: code \"T1000I\" is already used by e.yml",
        ] {
            assert!(text.contains(needle), "{needle:?} in {text}");
        }
    }

    #[test]
    fn gitlab_definitions_load_unchanged() {
        let text = "---\nname: add_gpg_key\ndescription: Event triggered when a GPG Key is added\nintroduced_by_issue: https://gitlab.com/gitlab-org/gitlab/-/issues/373961\nintroduced_by_mr: https://gitlab.com/gitlab-org/gitlab/-/merge_requests/111744\nfeature_category: source_code_management\nmilestone: '15.9'\nsaved_to_database: false\nstreamed: true\nscope: [User]\n";
        let r = load(&[("add_gpg_key.yml", text)]).unwrap();
        let t = r.get("add_gpg_key").unwrap();
        assert!(t.streamed && !t.saved_to_database);
        assert_eq!(t.scope, ["User"]);
        assert_eq!(t.version, 1);
        assert_eq!(t.severity, Severity::Info);
    }

    #[test]
    fn payloads_are_checked_with_every_violation() {
        let text = format!(
            "{GOOD}payload:\n  type: object\n  required: [ip, method]\n  properties:\n    ip: {{type: string, format: ipv4}}\n    method: {{enum: [password, sso]}}\n"
        );
        let r = load(&[("user_login.yml", &text)]).unwrap();
        let t = r.get("user_login").unwrap();
        assert!(
            t.check_payload(&payload(r#"{"ip": "10.0.0.1", "method": "sso"}"#))
                .is_ok()
        );
        let v = t
            .check_payload(&payload(r#"{"ip": "10.0.0.300"}"#))
            .unwrap_err();
        let paths: Vec<_> = v.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(paths.len(), 2, "{v:?}");
        assert!(paths.contains(&"/payload/ip"), "{v:?}");
        assert!(paths.contains(&"/payload"), "{v:?}");
    }

    /// Read in place, a payload gets the answer, paths and messages it got when read into a `serde_json::Value`.
    #[test]
    fn in_place_checks_answer_as_value_checks() {
        let schema = serde_json::json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["attempt", "tenant", "request_id", "at", "detail"],
            "properties": {
                "attempt": {"type": "integer", "minimum": 1},
                "tenant": {"type": "string", "pattern": "^[0-9a-f]{8}$"},
                "request_id": {"type": "string", "pattern": "^r-[0-9a-f]{8}-[0-9a-f]{12}$"},
                "at": {"type": "string", "format": "date-time"},
                "detail": {"type": "string", "minLength": 1, "maxLength": 8},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": true},
                "meta": {"type": "object", "propertyNames": {"maxLength": 3},
                         "additionalProperties": {"type": ["number", "null", "boolean"]}},
                "n": {"const": 2.0}
            }
        });
        // JSON is YAML: the schema goes into the definition as it is.
        let r = load(&[("user_login.yml", &format!("{GOOD}payload: {schema}\n"))]).unwrap();
        let t = r.get("user_login").unwrap();
        let value = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .should_ignore_unknown_formats(false)
            .build(&schema)
            .unwrap();
        let good = r#""attempt":1,"tenant":"0a1b2c3d","request_id":"r-0a1b2c3d-0123456789ab","at":"2026-12-03T09:00:00.123Z","detail":"d""#;
        for text in [
            format!("{{{good}}}"),
            format!(r#"{{{good},"tags":["a","b"],"meta":{{"x":1,"y":null,"z":true}},"n":2}}"#),
            format!(r#"{{{good},"tags":["a","a","c"],"meta":{{"long":1,"x":"s"}},"n":2.5}}"#),
            format!(r#"{{{good},"extra":1,"more":[1,{{"a":2}}]}}"#),
            r#"{"attempt":0,"tenant":"0A1B2C3D","request_id":"r-1","at":"2026-13-03T09:00:00Z","detail":""}"#.into(),
            r#"{"attempt":1.5,"tenant":7,"request_id":null,"at":"yesterday","detail":"much too long"}"#.into(),
            r#"{"attempt":1E400,"tenant":"\u0030a1b2c3d","request_id":"r-0a1b2c3d-0123456789ab","at":"2026-12-03T09:00:00Z","detail":"\u00e9"}"#.into(),
            r#"{"attempt":-1E400}"#.into(),
            r#"{}"#.into(),
        ] {
            // The old reading: numbers beyond a float bounded, then a `Value`.
            let bounded = text
                .replace("-1E400", "-1.7976931348623157e308")
                .replace("1E400", "1.7976931348623157e308");
            let v: Value = serde_json::from_str(&bounded).unwrap();
            let expected: Vec<(String, String)> = value
                .iter_errors(&v)
                .map(|e| (format!("/payload{}", e.instance_path()), e.to_string()))
                .collect();
            let got: Vec<(String, String)> = match t.check_payload(&payload(&text)) {
                Ok(()) => vec![],
                Err(v) => v.into_iter().map(|v| (v.path, v.message)).collect(),
            };
            assert_eq!(got, expected, "{text}");
        }
    }

    fn payload(text: &str) -> Payload<'_> {
        serde_json::from_str(text).unwrap()
    }

    /// Numbers are checked as the nearest 64-bit float, those past its range as its bound; the stored text keeps
    /// their digits (see `protocol`).
    #[test]
    fn schemas_check_numbers_of_any_size() {
        let text = format!(
            "{GOOD}payload:\n  type: object\n  properties:\n    n: {{type: integer, minimum: 0}}\n    x: {{type: number, maximum: 1e300}}\n"
        );
        let r = load(&[("user_login.yml", &text)]).unwrap();
        let t = r.get("user_login").unwrap();
        let check = |text: &str, expected: &[&str]| {
            let got = match t.check_payload(&payload(text)) {
                Ok(()) => vec![],
                Err(v) => v.into_iter().map(|v| v.path).collect(),
            };
            assert_eq!(got, expected, "{text}");
        };
        check(r#"{"n":123456789012345678901234567890}"#, &[]);
        check(r#"{"n":-123456789012345678901234567890}"#, &["/payload/n"]);
        // 1.23e29 parses as a float whose fraction is zero: an integer to JSON Schema (draft 2020-12).
        check(r#"{"n":1.23e29}"#, &[]);
        check(r#"{"n":1E400}"#, &[]);
        check(r#"{"n":-1E400}"#, &["/payload/n"]);
        check(r#"{"n":0.5}"#, &["/payload/n"]);
        check(r#"{"n":-0}"#, &[]);
        check(r#"{"x":0.1000000000000000055511151231257827}"#, &[]);
        check(r#"{"x":1E400}"#, &["/payload/x"]);
        check(r#"{"x":-1E400}"#, &[]);
        check(r#"{"x":1e-400}"#, &[]);
    }
}
