//! The Prometheus side: the scrape config and alert rules pass promtool's checks and unit tests,
//! and every metric an alert uses is one cfaudit exports.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const PROMETHEUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/prometheus");

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(PROMETHEUS)
        .output()
        .expect("promtool: run `make test` (tests/support/ensure-tools.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn config_and_rules_pass_promtool() {
    promtool(&["check", "config", "prometheus.yml"]);
    let rules = promtool(&["check", "rules", "alerts.yml"]);
    assert!(rules.contains("SUCCESS: 7 rules found"), "{rules}");
}

#[test]
fn every_alert_fires_in_its_unit_test() {
    let out = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    // Each alert of alerts.yml is exercised by the unit tests.
    let alerts = std::fs::read_to_string(Path::new(PROMETHEUS).join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(Path::new(PROMETHEUS).join("alerts_test.yml")).unwrap();
    for name in alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "{name} has no unit test"
        );
    }
}

#[test]
fn alerts_use_only_metrics_cfaudit_exports() {
    let metrics = cfaudit_actors::Metrics::new();
    // Touch every labelled family once so gather() lists it.
    let source = cfaudit_actors::SourceKey::new("a", cfaudit_actors::ApiVersion::V1);
    metrics.set_checkpoint(&source, chrono::Utc::now());
    metrics.expose_source(&source);
    metrics.source(&source).last_successful_sweep.set(1.0);
    let _ = metrics.actor("poller");
    let exported: BTreeSet<String> = metrics
        .registry
        .gather()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    let alerts = std::fs::read_to_string(Path::new(PROMETHEUS).join("alerts.yml")).unwrap();
    let used: BTreeSet<String> = alerts
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("cfaudit_") && !w.starts_with("cfaudit_dead_letters"))
        .map(str::to_owned)
        .collect();
    assert!(used.len() >= 6, "{used:?}");
    for name in &used {
        assert!(
            exported.contains(name),
            "alerts.yml uses {name}, which cfaudit does not export: {exported:?}"
        );
    }
}
