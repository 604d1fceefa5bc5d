# Sourced by demo.sh and bench.sh: starts the emulator in the background (stopped when the
# calling script exits) and exports the environment that points cfaudit at it.
# usage: start_emulator EMULATOR_BIN PORT EVENTS LOGFILE [EMULATOR OPTIONS…] (the cfaudit-emulator binary)
start_emulator() {
  local bin=$1 port=$2 events=$3 log=$4
  shift 4
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is taken by another program: stop it or choose another port" >&2
    exit 1
  fi
  "$bin" --listen "127.0.0.1:$port" --events "$events" "$@" >/dev/null 2>"$log" &
  EMULATOR_PID=$!
  trap 'kill $EMULATOR_PID 2>/dev/null || true' EXIT
  # Up to a minute: many accounts' data sets take a while to generate.
  for _ in $(seq 1 600); do
    if ! kill -0 "$EMULATOR_PID" 2>/dev/null; then
      echo "the emulator did not start (is port $port taken?):" >&2
      cat "$log" >&2
      exit 1
    fi
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  export CLOUDFLARE_API_BASE_URL="http://127.0.0.1:$port/client/v4"
  export CLOUDFLARE_API_TOKEN=demo-token-not-a-secret
  export CLOUDFLARE_ACCOUNT_ID=0123456789abcdef0123456789abcdef
  export INITIAL_CHECKPOINT=${INITIAL_CHECKPOINT:-2000-01-01}
}
