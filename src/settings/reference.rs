//! The configuration reference is generated from the structs of this module: their doc
//! comments (read through their JSON schema) and their defaults. The README's table and
//! `cfaudit.env` (systemd) cannot drift from them: these tests fail when they differ, and
//! `UPDATE_DOCS=1 cargo test -p cfaudit --lib reference` rewrites them.

use schemars::schema::{RootSchema, Schema, SchemaObject};

use super::*;

/// One setting as documented.
struct Entry {
    section: String,
    name: String,
    doc: String,
}

fn object(schema: &Schema) -> SchemaObject {
    schema.clone().into_object()
}

/// The struct a field of `Settings` refers to (a `$ref`, wrapped in `allOf` when documented).
fn referenced<'a>(root: &'a RootSchema, field: &SchemaObject) -> &'a SchemaObject {
    let reference = field.reference.clone().unwrap_or_else(|| {
        let all_of = field.subschemas.as_ref().and_then(|s| s.all_of.as_ref());
        object(&all_of.expect("a section refers to its struct")[0])
            .reference
            .expect("a reference")
    });
    let name = reference.rsplit('/').next().expect("a name");
    match &root.definitions[name] {
        Schema::Object(object) => object,
        Schema::Bool(_) => unreachable!("a struct"),
    }
}

fn description(schema: &SchemaObject) -> String {
    let doc = schema.metadata.as_ref().and_then(|m| m.description.clone());
    doc.expect("every setting and section has a doc comment")
}

/// Every section's title and its settings, in the order of the structs.
fn sections() -> Vec<(String, Vec<Entry>)> {
    let root = schemars::schema_for!(Settings);
    let mut sections = Vec::new();
    for (section, field) in &root.schema.object.as_ref().expect("a struct").properties {
        let field = object(field);
        let title = description(&field);
        let strukt = referenced(&root, &field);
        let entries: Vec<Entry> = strukt
            .object
            .as_ref()
            .expect("a struct")
            .properties
            .iter()
            .map(|(name, schema)| Entry {
                section: section.clone(),
                name: name.clone(),
                doc: description(&object(schema)),
            })
            .collect();
        sections.push((title, entries));
    }
    // `storage_options` is no setting of its own: every `AWS_*` variable.
    let storage = Entry {
        section: "lake".into(),
        name: "storage_options".into(),
        doc: "Object-store options: every `AWS_*` variable of the environment (lower-cased), \
              passed to object_store as it is (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, \
              `AWS_ACCESS_KEY_ID`, …)."
            .into(),
    };
    sections
        .iter_mut()
        .find(|(_, entries)| entries.iter().any(|e| e.section == "lake"))
        .expect("a lake section")
        .1
        .push(storage);
    sections
}

/// The default as an operator reads it; computed defaults are named in words.
fn default_in_words(entry: &Entry) -> String {
    match entry.name.as_str() {
        "initial_checkpoint" => "one poll interval ago".into(),
        "parquet_url" => "`file://$PWD/data/parquet`".into(),
        "storage_options" => "—".into(),
        _ => default_of(&entry.name).map_or("—".into(), |v| format!("`{v}`")),
    }
}

fn variable(entry: &Entry) -> String {
    if entry.name == "storage_options" {
        "AWS_*".into()
    } else {
        entry.name.to_uppercase()
    }
}

fn readme_table() -> String {
    let mut out = String::new();
    for (title, entries) in sections() {
        out.push_str(&format!(
            "\n{title}\n\n| environment variable | default | meaning |\n|---|---|---|\n"
        ));
        for entry in &entries {
            out.push_str(&format!(
                "| `{}` | {} | {} |\n",
                variable(entry),
                default_in_words(entry),
                entry.doc.replace('|', "\\|")
            ));
        }
    }
    out.push('\n');
    out
}

/// The systemd environment file: every setting, commented out at its default.
fn env_file() -> String {
    let head = include_str!("../../cfaudit.env");
    let head = &head[..head
        .find(GENERATED)
        .expect("cfaudit.env has the generated marker")];
    let mut out = format!("{head}{GENERATED}\n");
    for (title, entries) in sections() {
        out.push_str(&format!("\n# --- {title}\n"));
        for entry in entries.iter().filter(|e| e.name != "storage_options") {
            let value = match entry.name.as_str() {
                // The default depends on the working directory; this is the unit's.
                "parquet_url" => "file:///var/lib/cfaudit/parquet".into(),
                _ => default_of(&entry.name).unwrap_or_default(),
            };
            out.push_str(&format!(
                "\n# {}\n#{}={value}\n",
                entry.doc,
                variable(entry)
            ));
        }
    }
    out
}

const GENERATED: &str = "# --- Every setting, at its default (generated from src/settings) ---";
const START: &str = "<!-- configuration reference: generated from src/settings -->\n";
const END: &str = "<!-- end of the configuration reference -->";

fn check(path: &str, current: &str, wanted: &str) {
    if current == wanted {
        return;
    }
    if std::env::var_os("UPDATE_DOCS").is_some() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        std::fs::write(file, wanted).unwrap();
        return;
    }
    panic!("{path} is out of date with src/settings: run UPDATE_DOCS=1 cargo test -p cfaudit --lib reference");
}

#[test]
fn the_reference_lists_every_setting_once() {
    let mut documented: Vec<String> = sections()
        .into_iter()
        .flat_map(|(_, entries)| entries.into_iter().map(|e| e.name))
        .filter(|name| name != "storage_options")
        .collect();
    documented.sort();
    let mut all: Vec<String> = names().map(str::to_owned).collect();
    all.sort();
    assert_eq!(documented, all);
}

#[test]
fn the_readme_reference_is_generated_from_the_structs() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find(START)
        .expect("README has the reference start marker")
        + START.len();
    let end = readme
        .find(END)
        .expect("README has the reference end marker");
    let wanted = format!("{}{}{}", &readme[..start], readme_table(), &readme[end..]);
    check("README.md", readme, &wanted);
}

#[test]
fn the_systemd_env_file_is_generated_from_the_structs() {
    let current = include_str!("../../cfaudit.env");
    let wanted = env_file();
    check("cfaudit.env", current, &wanted);
    // And, uncommented, it is a valid configuration.
    let generated = &wanted[wanted.find(GENERATED).unwrap()..];
    let env: Vec<(String, String)> = generated
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| section_of(&k.to_lowercase()).is_some())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(env.len(), names().count());
    Settings::load_from(None, env).unwrap();
}
