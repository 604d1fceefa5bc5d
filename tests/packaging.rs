//! The Dockerfile, checked without a container engine (none runs here): what it copies exists,
//! what it runs is a real subcommand, its settings are real configuration keys, it does not run
//! as root, and it exposes the metrics port it configures.

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
            cfaudit::config::KEYS.contains(&name.to_lowercase().as_str()),
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
