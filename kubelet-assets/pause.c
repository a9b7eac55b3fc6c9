/* weft's sandbox ("pause") process: holds a pod's namespaces, reaps the children it inherits as PID 1,
 * and exits cleanly on SIGTERM or SIGINT. Built static (`gcc -static -Os`) by scripts/images.sh. */
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_stop(int sig) { (void)sig; stop = 1; }

static void on_child(int sig) {
  (void)sig;
  int saved = errno;
  while (waitpid(-1, 0, WNOHANG) > 0) {
  }
  errno = saved;
}

int main(void) {
  struct sigaction sa = {0};
  sa.sa_handler = on_stop;
  sigaction(SIGTERM, &sa, 0);
  sigaction(SIGINT, &sa, 0);
  sa.sa_handler = on_child;
  sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  sigaction(SIGCHLD, &sa, 0);
  while (!stop) {
    pause();
  }
  return 0;
}
