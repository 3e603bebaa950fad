# shellcheck shell=bash
# Helpers sourced by the launch scripts (not run on its own). Uses DRY_RUN (1: print commands instead).

die() {
    echo "error: $*" >&2
    exit 2
}

# run CMD...: run it, or print it under DRY_RUN=1. run_last: the same, but exec (signals reach the launcher).
run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}
run_last() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        run "$@"
    else
        exec "$@"
    fi
}
