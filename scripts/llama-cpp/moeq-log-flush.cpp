// moeq's log flush at exit, for the pinned llama.cpp tools (loaded with LD_PRELOAD by moeq's tool runner).
//
// The pinned llama.cpp leaks its logger singleton on purpose (common/log.cpp, common_log_main), so the lines
// its worker thread still holds when main returns are never written: a tool exits 0 without its last figures.
// Pausing the logger joins that thread after it has written everything queued, as upstream does case by case
// with common_log_pause(common_log_main()). This library does only that, once, as the process exits; it
// touches no other llama.cpp state, so every byte a tool writes to its output files is the same as without it.
struct common_log;
struct common_log * common_log_main();
void common_log_pause(struct common_log * log);

__attribute__((destructor)) static void moeq_log_flush_at_exit() {
    common_log_pause(common_log_main());
}
