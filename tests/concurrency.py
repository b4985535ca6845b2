"""Running one function on several threads at once, for the tests that
check results under concurrency."""
import threading


def concurrently(n: int, fn, timeout: float = 300.0) -> list:
    """fn(0) .. fn(n-1), each on its own thread, released together (a
    barrier); their results in order, an exception standing in for the
    result of a call that raised (any exception, not only assertions)."""
    results, barrier = [None] * n, threading.Barrier(n)

    def worker(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 — handed to the caller
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"a thread of {n} still runs after {timeout} s")
    return results


def all_returned(results: list) -> list:
    """``results``, after raising the first exception among them."""
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
