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

# run_last CMD...: the launcher, last: started in its own process group, and SIGTERM/SIGINT/SIGHUP to this script
# go to that whole group (the deepspeed runner, its launcher and every rank), so no rank is left orphaned; the
# ranks then write a checkpoint at their next step boundary and exit (train.py, exit code 6). Exits with the
# launcher's code.
run_last() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        run "$@"
        return
    fi
    setsid "$@" &
    local pid=$! code=0
    trap 'kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null' TERM INT HUP
    while true; do
        wait "$pid"
        code=$?
        kill -0 "$pid" 2>/dev/null || break  # a trapped signal interrupted `wait`: keep waiting for the group
    done
    trap - TERM INT HUP
    exit "$code"
}
