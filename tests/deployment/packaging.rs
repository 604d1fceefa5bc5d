//! The Dockerfile and the systemd unit, checked without a container engine or a running
//! systemd (neither runs here). Dockerfile: what it copies exists, what it runs is a real
//! subcommand, its settings are real configuration keys, it does not run as root, and it
//! exposes the metrics port it configures. Unit: `systemd-analyze verify` and `security
//! --offline` accept it, and it agrees with the binary and `cfaudit.env`.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn dockerfile() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).expect("Dockerfile")
}

fn subcommands() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_cfaudit"))
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn every_copied_path_exists() {
    for line in dockerfile()
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(
                Path::new(ROOT).join(source).exists(),
                "{line}: {source} does not exist"
            );
        }
    }
}

#[test]
fn healthcheck_entrypoint_and_cmd_are_real_subcommands() {
    let help = subcommands();
    let text = dockerfile();
    let healthcheck = text
        .lines()
        .find(|l| l.contains("CMD [\"cfaudit\""))
        .expect("a HEALTHCHECK CMD");
    assert!(
        healthcheck.contains("\"healthcheck\"") && help.contains("healthcheck"),
        "{healthcheck}"
    );
    assert!(text.contains("ENTRYPOINT [\"cfaudit\"]"));
    let cmd = text.lines().find(|l| l.starts_with("CMD ")).expect("CMD");
    assert!(cmd.contains("\"run\"") && help.contains("  run "), "{cmd}");
}

#[test]
fn environment_names_are_configuration_keys_and_the_port_matches() {
    let text = dockerfile();
    let env_block: Vec<&str> = text
        .split("ENV ")
        .nth(1)
        .expect("an ENV block")
        .lines()
        .take_while(|l| l.trim_end().ends_with('\\') || l.contains('='))
        .collect();
    let mut metrics_port = None;
    for assignment in env_block
        .iter()
        .map(|l| l.trim().trim_end_matches('\\').trim())
    {
        let (name, value) = assignment.split_once('=').expect("NAME=value");
        assert!(
            cfaudit::settings::section_of(&name.to_lowercase()).is_some(),
            "{name} is not a setting"
        );
        if name == "METRICS_ADDR" {
            metrics_port = value.rsplit(':').next().map(str::to_owned);
        }
    }
    let expose = text
        .lines()
        .find(|l| l.starts_with("EXPOSE "))
        .expect("EXPOSE");
    assert_eq!(
        Some(expose.trim_start_matches("EXPOSE ").trim().to_owned()),
        metrics_port
    );
}

#[test]
fn the_runtime_image_is_not_root() {
    let text = dockerfile();
    let runtime = text.rsplit("FROM ").next().unwrap();
    let user = runtime
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("USER in the runtime stage");
    assert!(!user.contains("root") && user.trim() != "USER 0", "{user}");
}

// systemd: cfaudit.service and cfaudit.env, checked by systemd's own offline tools.

fn unit() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("cfaudit.service")).expect("cfaudit.service")
}

fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("cfaudit.service has no {key}="))
}

/// The unit with ExecStart pointing at the binary just built (verify checks it exists).
fn unit_for_verify() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cfaudit.service");
    let text = unit().replace("/usr/local/bin/cfaudit", env!("CARGO_BIN_EXE_cfaudit"));
    std::fs::write(&file, text).unwrap();
    (dir, file)
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (Debian's systemd package) checks the unit")
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let (_dir, file) = unit_for_verify();
    let file = file.to_str().unwrap();
    let verify = systemd_analyze(&["verify", file]);
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify: {complaints}"
    );
    // Exposure 0.0 (locked down) to 10.0 (unsafe); the threshold is ×10. The unit scores 1.2.
    let security = systemd_analyze(&["security", "--offline=true", "--threshold=20", file]);
    assert!(
        security.status.success(),
        "exposure above 2.0:\n{}",
        String::from_utf8_lossy(&security.stdout)
    );
}

#[test]
fn the_systemd_unit_matches_the_binary_and_its_configuration() {
    let unit = unit();
    assert_eq!(unit_value(&unit, "ExecStart"), "/usr/local/bin/cfaudit run");
    assert!(subcommands().contains("  run "));
    assert_eq!(unit_value(&unit, "Restart"), "always");
    assert_eq!(unit_value(&unit, "User"), "cfaudit");
    assert_eq!(
        unit_value(&unit, "EnvironmentFile"),
        "/etc/cfaudit/cfaudit.env"
    );
    // Docker would kill it while draining otherwise; systemd likewise.
    let stop: u64 = unit_value(&unit, "TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .unwrap();
    let settings = cfaudit::settings::Settings::load_from(None, Vec::new()).unwrap();
    assert!(stop > settings.service.shutdown_timeout.as_secs());
    // A configuration error exits 2, and restarting cannot fix it.
    let bad = Command::new(env!("CARGO_BIN_EXE_cfaudit"))
        .args(["run", "--once"])
        .env_clear()
        .env("CLOUDFLARE_PER_PAGE", "5000")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(unit_value(&unit, "RestartPreventExitStatus"), "2");
    // The env file's Parquet folder is in the unit's state directory, the one place it may write.
    let env = std::fs::read_to_string(Path::new(ROOT).join("cfaudit.env")).unwrap();
    let state = format!("/var/lib/{}", unit_value(&unit, "StateDirectory"));
    let parquet = env
        .lines()
        .find_map(|l| l.strip_prefix("PARQUET_URL="))
        .unwrap();
    assert!(
        parquet.starts_with(&format!("file://{state}/")),
        "{parquet}"
    );
    // Its settings, with the two an operator must fill in, make a valid configuration.
    let mut settings: Vec<(String, String)> = env
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    for (name, _) in &settings {
        let key = name.to_lowercase();
        assert!(
            cfaudit::settings::section_of(&key).is_some() || name == "RUST_LOG",
            "{name} is not a setting"
        );
    }
    settings.push(("CLOUDFLARE_API_TOKEN".into(), "t".into()));
    settings.push(("CLOUDFLARE_ACCOUNT_ID".into(), "0123abcd".into()));
    let loaded = cfaudit::settings::Settings::load_from(None, settings).unwrap();
    loaded.cloudflare.require_accounts().unwrap();
}
