# shellcheck shell=bash
# Helpers sourced by the launch scripts (not run on its own). Uses DRY_RUN (1: print commands instead).

die() {
    echo "error: $*" >&2
    exit 2
}

# run CMD...: run it, or print it under DRY_RUN=1.
run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# children_of PID...: the processes whose parent is one of PID...
children_of() {
    local p
    for p in "$@"; do
        pgrep -P "$p" || true
    done
}

# run_last CMD...: the launcher, last, started in its own process group; exits with the launcher's code. The first
# SIGTERM/SIGINT/SIGHUP to this script goes to the ranks alone (deepspeed -> launch.py -> ranks, on this node): they
# write a checkpoint at their next step boundary and exit 6 (train.py), which launch.py and the runner pass on, so
# the script exits 6. Signalling launch.py too would make it exit 1 and kill the ranks 30 s later, whatever their
# checkpoint needs. A second signal, one before the ranks exist, or one to a runner that starts pdsh (which stops
# the remote nodes itself) goes to the whole group.
run_last() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        run "$@"
        return
    fi
    setsid "$@" &
    local pid=$! code=0 stops=0
    trap 'stop_launched "$pid"' TERM INT HUP
    while true; do
        code=0
        wait "$pid" || code=$?  # (under set -e, a `wait` that a trapped signal interrupts would end the script)
        kill -0 "$pid" 2>/dev/null || break  # a trapped signal interrupted `wait`: keep waiting for the group
    done
    trap - TERM INT HUP
    exit "$code"
}

# stop_launched PID: (run_last's trap) SIGTERM to the ranks under launcher PID the first time, to its group after
stop_launched() {
    local ranks=() launch
    if [[ "$stops" -eq 0 ]]; then
        for launch in $(children_of "$1"); do
            if ps -o args= -p "$launch" | grep -q "deepspeed.launcher.launch"; then
                mapfile -t -O "${#ranks[@]}" ranks < <(children_of "$launch")
            fi
        done
    fi
    stops=$((stops + 1))
    if [[ ${#ranks[@]} -gt 0 ]]; then
        kill -TERM "${ranks[@]}" 2>/dev/null || true
    else
        kill -TERM -- "-$1" 2>/dev/null || kill -TERM "$1" 2>/dev/null || true
    fi
}
