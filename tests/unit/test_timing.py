import time

from rlhf.actors.timing import with_compute_clock


class Worker:
    def __init__(self, delay):
        self.delay = delay

    def work(self, x):
        time.sleep(self.delay)
        return x * 2

    def _private(self):
        return 1


def test_public_methods_are_timed_and_behave_the_same():
    w = with_compute_clock(Worker)(0.01)
    assert w.work(3) == 6 and w._private() == 1
    log = w.pop_compute_seconds()
    assert [name for name, _ in log] == ["work"]
    assert log[0][1] >= 0.01
    assert w.pop_compute_seconds() == []
    assert isinstance(w, Worker) and type(w).__name__ == "Worker"
