//! Deployment checks, apart from the integration tests: the compose file, the Dockerfile and
//! the systemd unit, checked against the code without a container engine or systemd.

mod compose;
mod packaging;
