//! docker-compose.yml, checked without a container engine (none runs here): parsed, every
//! referenced file, port, variable, setting, subcommand and health check compared with the
//! repository and the code. The cfaudit services' environments, interpolated as Compose would
//! (with no .env, and with .env.example), must load as a valid configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use cfaudit::settings::{default_of, section_of, Settings};
use cfaudit_emulator::{DEMO_ACCOUNT, DEMO_TOKEN};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const IMAGE: &str = "cfaudit:local";

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Value {
    serde_yaml_ng::from_str(&read("docker-compose.yml")).expect("docker-compose.yml parses")
}

fn services() -> BTreeMap<String, Value> {
    serde_json::from_value(compose()["services"].clone()).unwrap()
}

fn profiles(service: &Value) -> Vec<String> {
    serde_json::from_value(service["profiles"].clone()).unwrap_or_default()
}

/// The services Compose starts with these profiles enabled.
fn enabled(active: &[&str]) -> BTreeSet<String> {
    services()
        .into_iter()
        .filter(|(_, s)| {
            let p = profiles(s);
            p.is_empty() || p.iter().any(|p| active.contains(&p.as_str()))
        })
        .map(|(name, _)| name)
        .collect()
}

fn ours() -> Vec<(String, Value)> {
    services()
        .into_iter()
        .filter(|(_, s)| s["image"] == IMAGE)
        .collect()
}

/// Compose's interpolation: `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$$`.
fn interpolate(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(inner) = after.strip_prefix('{') {
            let close = inner.find('}').expect("closed ${");
            let expr = &inner[..close];
            let (name, default, empty_too) = match (expr.find(":-"), expr.find('-')) {
                (Some(i), _) => (&expr[..i], &expr[i + 2..], true),
                (None, Some(i)) => (&expr[..i], &expr[i + 1..], false),
                _ => (expr, "", true),
            };
            assert!(
                !name.contains('?'),
                "a ${{VAR?}} guard would stop the demo: {expr}"
            );
            let value = vars.get(name).filter(|v| !(empty_too && v.is_empty()));
            out.push_str(value.map_or(default, String::as_str));
            rest = &inner[close + 1..];
        } else {
            panic!("bare $ (write $$ or ${{VAR}}): {text}");
        }
    }
    out.push_str(rest);
    out
}

/// Every `${VAR…}` name in the file's values (comments are not interpolated).
fn variables() -> BTreeSet<String> {
    fn walk(value: &Value, found: &mut BTreeSet<String>) {
        match value {
            Value::String(text) => {
                for s in text.replace("$$", "").split("${").skip(1) {
                    let name = s
                        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .next()
                        .unwrap();
                    found.insert(name.to_owned());
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            Value::Object(map) => map.values().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let mut found = BTreeSet::new();
    walk(&compose(), &mut found);
    assert!(found.contains("CLOUDFLARE_API_TOKEN"), "{found:?}");
    found
}

/// `.env.example` as Compose reads it (comments and commented-out lines ignored).
fn env_example() -> BTreeMap<String, String> {
    read(".env.example")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// A service's environment after interpolation.
fn environment(service: &Value, vars: &BTreeMap<String, String>) -> Vec<(String, String)> {
    service["environment"]
        .as_object()
        .expect("environment as a mapping")
        .iter()
        .map(|(k, v)| {
            let v = v
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string());
            (k.clone(), interpolate(&v, vars))
        })
        .collect()
}

fn help(args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cfaudit"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap()
}

fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap()
}

#[test]
fn structure_images_mounts_and_volumes() {
    let compose = compose();
    for key in compose.as_object().unwrap().keys() {
        assert!(
            key == "services" || key == "volumes" || key.starts_with("x-"),
            "unexpected top-level key {key} (no `version:` in the Compose Specification)"
        );
    }
    let declared: BTreeSet<String> = compose["volumes"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for (name, service) in services() {
        let image = service["image"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no image"));
        let (_, tag) = image
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{name}: {image} is not pinned"));
        assert!(
            tag != "latest" && !tag.is_empty(),
            "{name}: {image} is not pinned"
        );
        if image == IMAGE {
            assert!(
                service["build"] == "." || service["pull_policy"] == "never",
                "{name}: {IMAGE} is built here, never pulled"
            );
        }
        for mount in service["volumes"].as_array().into_iter().flatten() {
            let source = mount.as_str().unwrap().split(':').next().unwrap();
            if let Some(path) = source.strip_prefix("./") {
                assert!(
                    Path::new(ROOT).join(path).exists(),
                    "{name}: {source} does not exist"
                );
            } else {
                assert!(
                    declared.contains(source),
                    "{name}: volume {source} is not declared"
                );
            }
        }
        for port in service["ports"].as_array().into_iter().flatten() {
            assert!(
                port.as_str().unwrap().starts_with("127.0.0.1:"),
                "{name}: {port} beyond loopback"
            );
        }
    }
    // The mounted files are the ones the other tests check.
    assert!(read("docker-compose.yml").contains("./grafana/prometheus:/etc/prometheus"));
    assert!(read("docker-compose.yml").contains("./grafana/provisioning:/etc/grafana/provisioning"));
    assert!(read("docker-compose.yml").contains("./grafana/dashboards:/var/lib/grafana/dashboards"));
}

#[test]
fn profiles_give_a_real_stack_and_a_demo() {
    let base: BTreeSet<String> = [
        "timescaledb",
        "minio",
        "minio-init",
        "prometheus",
        "grafana",
    ]
    .map(String::from)
    .into();
    let with = |extra: &[&str]| -> BTreeSet<String> {
        base.iter()
            .cloned()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    assert_eq!(enabled(&["demo"]), with(&["emulator", "cfaudit-demo"]));
    let from_env = env_example()["COMPOSE_PROFILES"].clone();
    assert_eq!(enabled(&[from_env.as_str()]), with(&["cfaudit"]));
    assert_eq!(
        enabled(&[]),
        base,
        "no profile: no cfaudit without its settings"
    );

    let services = services();
    for (name, service) in &services {
        let Some(deps) = service["depends_on"].as_object() else {
            continue;
        };
        for (dep, how) in deps {
            let target = services
                .get(dep)
                .unwrap_or_else(|| panic!("{name}: no service {dep}"));
            let condition = how["condition"].as_str().unwrap();
            match condition {
                "service_healthy" => assert!(
                    target["healthcheck"].is_object(),
                    "{name} waits on {dep}, which has no healthcheck"
                ),
                "service_completed_successfully" => {
                    assert_eq!(target["restart"], "no", "{dep} runs once")
                }
                other => panic!("{name}: condition {other}"),
            }
            let (mine, theirs) = (profiles(service), profiles(target));
            assert!(
                theirs.is_empty() || theirs.iter().all(|p| mine.contains(p)),
                "{name} depends on {dep} of another profile"
            );
        }
        if service["restart"] != "no" {
            assert_eq!(
                service["restart"], "unless-stopped",
                "{name}: restarted like a supervisor"
            );
        }
    }
}

#[test]
fn every_variable_is_in_env_example_and_secrets_are_placeholders() {
    let example = read(".env.example");
    for name in variables() {
        assert!(
            example
                .lines()
                .any(|l| l.trim_start_matches("# ").starts_with(&format!("{name}="))),
            ".env.example does not mention {name}"
        );
    }
    let vars = env_example();
    for secret in [
        "CLOUDFLARE_API_TOKEN",
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
    ] {
        let value = &vars[secret];
        assert!(
            value.is_empty() || value.starts_with("change-me"),
            "{secret} in .env.example looks real"
        );
    }
    // The commented-out tuning defaults are the code's.
    for line in example.lines().filter_map(|l| l.strip_prefix("# ")) {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let key = name.to_lowercase();
        if section_of(&key).is_some() && key != "initial_checkpoint" {
            let default = default_of(&key).unwrap_or_default();
            assert_eq!(
                value, default,
                ".env.example shows a wrong default for {name}"
            );
        }
    }
    let ignored = read(".gitignore");
    assert!(
        ignored.lines().any(|l| l == "/.env" || l == ".env"),
        ".env must never be committed"
    );
    assert!(
        read(".dockerignore").lines().any(|l| l == ".env"),
        ".env must not reach the image"
    );
}

#[test]
fn cfaudit_services_get_a_valid_configuration_and_real_subcommands() {
    let subcommands = help(&[]);
    let no_env = BTreeMap::new();
    let example = env_example();
    let mut scraped = None;
    for (name, service) in ours() {
        let command: Vec<String> = serde_json::from_value(service["command"].clone()).unwrap();
        // The emulator is its own binary in the same image; every other service runs cfaudit.
        let emulator = service["entrypoint"] == serde_json::json!(["cfaudit-emulator"]);
        assert!(
            emulator || subcommands.contains(&format!("  {} ", command[0])),
            "{name}: {command:?}"
        );
        assert_eq!(
            service["healthcheck"]["test"],
            serde_json::json!(["CMD", "cfaudit", "healthcheck"]),
            "{name}: the image has no curl"
        );
        for vars in [&no_env, &example] {
            let env = environment(&service, vars);
            for (key, _) in &env {
                let lower = key.to_lowercase();
                assert!(
                    section_of(&lower).is_some() || key.starts_with("AWS_") || key == "RUST_LOG",
                    "{name}: {key} is not a cfaudit setting"
                );
            }
            let config = Settings::load_from(None, env.clone())
                .unwrap_or_else(|e| panic!("{name}: the environment does not load: {e}"));
            if emulator {
                let args =
                    std::iter::once("cfaudit-emulator").chain(command.iter().map(String::as_str));
                cfaudit_emulator::EmulatorConfig::parse_args(args)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let listen = &command[command.iter().position(|a| a == "--listen").unwrap() + 1];
                assert_eq!(
                    port_of(listen),
                    port_of(&config.service.metrics_addr.to_string()),
                    "{name}: healthcheck port"
                );
                continue;
            }
            assert_eq!(command, ["run"]);
            let port = config.service.metrics_addr.port().to_string();
            let ports: Vec<String> = serde_json::from_value(service["ports"].clone()).unwrap();
            // One host port per replica, from a range that starts at the service's port.
            assert_eq!(ports.len(), 1, "{name}");
            let (host, container) = ports[0].rsplit_once(':').unwrap();
            assert_eq!(container, port, "{name}");
            assert!(
                host.strip_prefix("127.0.0.1:")
                    .is_some_and(|range| range == port || range.starts_with(&format!("{port}-"))),
                "{name}: {host}"
            );
            scraped = Some(port.clone());
            let bucket = config
                .lake
                .parquet_url
                .strip_prefix("s3://")
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_owned();
            let init = &services()["minio-init"];
            let created = interpolate(
                init["environment"]["CFAUDIT_BUCKET"].as_str().unwrap(),
                vars,
            );
            assert_eq!(
                bucket, created,
                "{name} writes to the bucket minio-init creates"
            );
            let endpoint = env.iter().find(|(k, _)| k == "AWS_ENDPOINT").unwrap();
            assert_eq!(endpoint.1, "http://minio:9000");
            if name == "cfaudit-demo" {
                config
                    .cloudflare
                    .require_accounts()
                    .expect("the demo needs no account");
                assert_eq!(
                    config.cloudflare.api_token.as_ref().unwrap().expose(),
                    DEMO_TOKEN
                );
                assert_eq!(config.cloudflare.account_id.as_deref(), Some(DEMO_ACCOUNT));
                let emulator = &services()["emulator"];
                let listen: Vec<String> =
                    serde_json::from_value(emulator["command"].clone()).unwrap();
                let listen = &listen[listen.iter().position(|a| a == "--listen").unwrap() + 1];
                assert!(config
                    .cloudflare
                    .api_base_url
                    .starts_with(&format!("http://emulator:{}/", port_of(listen))));
                assert!(config.sweep.initial_checkpoint.is_some());
            }
        }
        let grace = service["stop_grace_period"].as_str().unwrap_or("10s");
        let grace: u64 = grace.strip_suffix('s').unwrap().parse().unwrap();
        if command[0] == "run" {
            assert!(
                grace > Settings::default().service.shutdown_timeout.as_secs(),
                "{name}: Docker would kill it while it drains"
            );
        }
    }
    // Prometheus finds every replica by the name `cfaudit` (which the demo answers to too) and
    // scrapes that port.
    let prometheus = read("grafana/prometheus/prometheus.yml");
    let port = scraped.expect("a service runs cfaudit");
    assert!(
        prometheus.contains(&format!(
            "- names: [\"cfaudit\"]\n        type: A\n        port: {port}\n"
        )),
        "prometheus.yml scrapes another name or port"
    );
    assert!(read("Dockerfile").contains(&format!("EXPOSE {port}")));
    let demo = &services()["cfaudit-demo"];
    assert!(demo["networks"]["default"]["aliases"]
        .as_array()
        .unwrap()
        .contains(&"cfaudit".into()));
}

/// Both cfaudit services are written out in full; what is not about the API must not drift.
#[test]
fn the_demo_service_differs_from_the_real_one_only_in_the_api() {
    let services = services();
    let (real, demo) = (&services["cfaudit"], &services["cfaudit-demo"]);
    for key in [
        "build",
        "image",
        "command",
        "restart",
        "stop_grace_period",
        "read_only",
        "healthcheck",
        "ports",
    ] {
        assert_eq!(real[key], demo[key], "{key}");
    }
    for dep in real["depends_on"].as_object().unwrap().keys() {
        assert_eq!(
            real["depends_on"][dep], demo["depends_on"][dep],
            "depends_on {dep}"
        );
    }
    let api = |k: &str| {
        k.starts_with("CLOUDFLARE_") || k == "INITIAL_CHECKPOINT" || k == "POLL_INTERVAL_SECONDS"
    };
    let vars = BTreeMap::new();
    let real_env: BTreeMap<_, _> = environment(real, &vars)
        .into_iter()
        .filter(|(k, _)| !api(k))
        .collect();
    let demo_env: BTreeMap<_, _> = environment(demo, &vars)
        .into_iter()
        .filter(|(k, _)| !api(k))
        .collect();
    let real_env: BTreeMap<_, _> = real_env
        .into_iter()
        .filter(|(k, v)| !v.is_empty() || demo_env.contains_key(k))
        .collect();
    assert_eq!(real_env, demo_env);
}

/// Every program a service of our image runs (its entrypoint, else the image's) is built and
/// copied into the image's `/usr/local/bin` by the Dockerfile.
#[test]
fn every_program_our_services_run_is_in_the_image() {
    let dockerfile = read("Dockerfile");
    for (name, service) in ours() {
        let program = service["entrypoint"][0].as_str().unwrap_or("cfaudit");
        assert!(
            dockerfile.contains(&format!(
                "/src/target/release/{program} /usr/local/bin/{program}"
            )),
            "{name}: the image has no {program}"
        );
        assert!(
            dockerfile.contains(&format!("-p {program}")),
            "{name}: the image's build does not build {program}"
        );
    }
}
