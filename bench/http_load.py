"""Our own HTTP/1.1 load generator: plain sockets, one epoll loop, no
dependencies. Two modes:

- closed loop (``run_closed``): each connection sends its next request as
  soon as the previous answer is complete; for an exact number of requests
  (100k adds for the RSS measurement, the cache fill) and as the fallback
  when wrk is missing. The harness reports its own CPU use next to the
  server's, so it is visible whether it or the server is the bottleneck
  (``loadgen_check`` compares it with wrk on the ceiling server).
- paced, open loop (``run_paced``): requests are due on a fixed schedule
  whatever the server does; latency is counted from the moment a request was
  due (not from when it could be sent), so a slow server cannot hide its
  queueing (no coordinated omission). wrk2's ``-R`` is not in Debian's wrk,
  which is why this exists.

Each connection has one request in flight at a time (no pipelining); the
answer is framed by Content-Length or chunked encoding.
"""

import heapq
import resource
import select
import socket
import time
from array import array
from collections import deque

_perf = time.perf_counter


def _connect(host, port, count):
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    return socks


def _response_end(buf):
    """(end offset, status) of the first complete response in ``buf``, or None."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    status = int(buf[9:12])
    head = bytes(buf[:head_end]).lower()
    body_start = head_end + 4
    i = head.find(b"\r\ncontent-length:")
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        length = int(head[i + 17:j if j >= 0 else len(head)])
        end = body_start + length
        return (end, status) if len(buf) >= end else None
    if b"\r\ntransfer-encoding: chunked" in head:
        pos = body_start
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            pos = line_end + 2 + size + 2
            if len(buf) < pos:
                return None
            if size == 0:
                return pos, status
    # No length: ends with the connection (not used by our servers).
    raise RuntimeError("response without Content-Length or chunked encoding")


def percentiles(values, points=(50, 90, 99, 99.9)):
    """{'p50': ..} in the unit of ``values`` (nearest rank)."""
    if not values:
        return {f"p{str(p).replace('.', '')}": None for p in points}
    ordered = sorted(values)
    n = len(ordered)
    out = {}
    for p in points:
        rank = max(0, min(n - 1, int(-(-p * n // 100)) - 1))
        out["p" + str(p).replace(".", "")] = ordered[rank]
    out["max"] = ordered[-1]
    out["mean"] = sum(ordered) / n
    return out


class Result(dict):
    """requests, seconds, rate, statuses, latency_us {p50, p90, p99, p999,
    max, mean}, client_cpu_s; paced runs add send_lag_us."""


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_closed(host, port, streams, duration=None, total=None, drain_timeout=10.0):
    """One connection per iterator in ``streams`` (each yields request bytes).
    Stops after ``duration`` seconds or ``total`` requests, whichever first."""
    if duration is None and total is None:
        raise ValueError("give a duration or a total")
    socks = _connect(host, port, len(streams))
    ep = select.epoll()
    conns = {}
    for s, stream in zip(socks, streams):
        conns[s.fileno()] = [s, stream, bytearray(), 0.0, 0]  # sock, stream, buffer, sent at, answered
        ep.register(s.fileno(), select.EPOLLIN)
    lat = array("d")
    statuses = {}
    issued = 0
    in_flight = 0
    cpu0 = _cpu()
    t0 = _perf()
    deadline = t0 + duration if duration is not None else float("inf")
    limit = total if total is not None else float("inf")

    def send(c):
        """Send the connection's next request; False when its stream is done."""
        nonlocal issued, in_flight
        data = next(c[1], None)
        if data is None:
            return False
        c[3] = _perf()
        c[0].sendall(data)
        issued += 1
        in_flight += 1
        return True

    try:
        for c in conns.values():
            if issued < limit:
                send(c)
        stop_at = None
        while in_flight:
            now = _perf()
            if stop_at is None and (now >= deadline or issued >= limit):
                stop_at = now
            if stop_at is not None and now - stop_at > drain_timeout:
                raise RuntimeError(f"{in_flight} requests unanswered {drain_timeout}s after the end")
            for fd, _ in ep.poll(0.2):
                c = conns[fd]
                data = c[0].recv(262144)
                if not data:
                    raise RuntimeError("server closed a connection")
                buf = c[2]
                buf += data
                while True:
                    found = _response_end(buf)
                    if found is None:
                        break
                    end, status = found
                    del buf[:end]
                    done = _perf()
                    lat.append(done - c[3])
                    c[4] += 1
                    statuses[status] = statuses.get(status, 0) + 1
                    in_flight -= 1
                    if issued < limit and done < deadline:
                        send(c)
        elapsed = _perf() - t0
    finally:
        ep.close()
        for s in socks:
            s.close()
    cpu = _cpu() - cpu0
    r = Result(requests=len(lat), seconds=elapsed, rate=len(lat) / elapsed if elapsed else 0.0,
               statuses={str(k): v for k, v in sorted(statuses.items())}, client_cpu_s=cpu,
               client_cpu_util=cpu / elapsed if elapsed else 0.0,
               per_thread=[c[4] for c in conns.values()])
    r["latency_us"] = {k: v * 1e6 for k, v in percentiles(lat).items()}
    return r


def run_paced(host, port, sequences, rate, duration, step_gap, connections=64, drain_timeout=10.0):
    """Open loop at ``rate`` requests/s for ``duration`` seconds.

    ``sequences(i)`` returns the list of request bytes of sequence ``i``;
    sequence i starts at t0 + i * len/rate, its step j is due at
    start + j * step_gap but never before step j-1 was answered (steps of one
    routed request are causally ordered, as in the gateway). A request waits
    for a free connection if all ``connections`` are busy; that wait counts
    in its latency.
    """
    socks = _connect(host, port, connections)
    ep = select.epoll()
    conns = {}
    idle = []
    for s in socks:
        conns[s.fileno()] = [s, bytearray(), None]  # sock, buffer, (due, sent, seq, step, reqs)
        ep.register(s.fileno(), select.EPOLLIN)
        idle.append(s.fileno())
    fds = list(conns)
    select_ok = max(fds) < 1024  # FD_SETSIZE
    waiting = deque()
    heap = []  # (due, seq, step, requests)
    lat = array("d")
    service = array("d")  # from the moment it was sent: without the generator's own lateness
    lag = array("d")
    statuses = {}
    first = sequences(0)
    per_seq = len(first)
    interval = per_seq / rate
    in_flight = 0
    cpu0 = _cpu()
    t0 = _perf() + 0.05
    end = t0 + duration
    next_seq = 0
    max_waiting = 0

    def send(fd, item):
        nonlocal in_flight
        due, seq, step, reqs = item
        c = conns[fd]
        now = _perf()
        c[2] = (due, now, seq, step, reqs)
        c[0].sendall(reqs[step])
        lag.append(now - due)
        in_flight += 1

    try:
        while True:
            now = _perf()
            while next_seq * interval + t0 <= now and next_seq * interval + t0 < end:
                start = t0 + next_seq * interval
                heapq.heappush(heap, (start, next_seq, 0, first if next_seq == 0 else sequences(next_seq)))
                next_seq += 1
            while heap and heap[0][0] <= now:
                item = heapq.heappop(heap)
                if idle:
                    send(idle.pop(), item)
                else:
                    waiting.append(item)
                    max_waiting = max(max_waiting, len(waiting))
            if now >= end and not heap and not waiting and not in_flight:
                break
            if now > end + drain_timeout:
                raise RuntimeError(f"{in_flight + len(waiting) + len(heap)} requests unanswered "
                                   f"{drain_timeout}s after the end")
            upcoming = min(heap[0][0] if heap else end, next_seq * interval + t0)
            wait = min(max(upcoming - now, 0.0), 0.2)
            if 0 < wait < 0.002 and select_ok:
                # epoll's timeout is in whole milliseconds; select's in
                # microseconds: wait for the next due request without spinning.
                ready = [(fd, 0) for fd in select.select(fds, (), (), wait)[0]]
            else:
                ready = ep.poll(wait - 0.001 if wait >= 0.002 else 0)
            for fd, _ in ready:
                c = conns[fd]
                data = c[0].recv(262144)
                if not data:
                    raise RuntimeError("server closed a connection")
                buf = c[1]
                buf += data
                found = _response_end(buf)
                if found is None:
                    continue
                stop, status = found
                del buf[:stop]
                done = _perf()
                due, sent, seq, step, reqs = c[2]
                c[2] = None
                in_flight -= 1
                lat.append(done - due)
                service.append(done - sent)
                statuses[status] = statuses.get(status, 0) + 1
                if step + 1 < len(reqs):
                    start = t0 + seq * interval
                    heapq.heappush(heap, (max(start + (step + 1) * step_gap, done), seq, step + 1, reqs))
                if waiting:
                    send(fd, waiting.popleft())
                else:
                    idle.append(fd)
        elapsed = _perf() - t0
    finally:
        ep.close()
        for s in socks:
            s.close()
    cpu = _cpu() - cpu0
    r = Result(requests=len(lat), seconds=elapsed, rate=len(lat) / elapsed if elapsed else 0.0,
               target_rate=rate, statuses={str(k): v for k, v in sorted(statuses.items())},
               client_cpu_s=cpu, connections=connections, step_gap_ms=step_gap * 1e3,
               max_waiting_for_connection=max_waiting)
    r["latency_us"] = {k: v * 1e6 for k, v in percentiles(lat).items()}
    r["send_lag_us"] = {k: v * 1e6 for k, v in percentiles(lag).items()}
    r["service_latency_us"] = {k: v * 1e6 for k, v in percentiles(service).items()}
    return r


def _body(buf, end):
    """The body of the complete response at the start of ``buf`` (ending at
    ``end``, from ``_response_end``), chunked encoding removed."""
    head_end = buf.find(b"\r\n\r\n")
    body = bytes(buf[head_end + 4:end])
    if b"\r\ntransfer-encoding: chunked" not in bytes(buf[:head_end]).lower():
        return body
    out, pos = [], 0
    while True:
        line_end = body.find(b"\r\n", pos)
        size = int(body[pos:line_end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[line_end + 2:line_end + 2 + size])
        pos = line_end + 2 + size + 2


def run_sequences(targets, check, drain_timeout=10.0):
    """Closed loop over causal sequences, for several servers at once.

    ``targets``: [(host, port, connections, sequences)], where ``sequences``
    is a list of sequences and a sequence a list of request bytes (the steps
    of one routed request, e.g. add, prompt delete, delete). Each of a
    target's ``connections`` takes that target's next sequence, sends its
    first step, and sends each next step only once the previous one was
    answered (causal order, as a gateway does); then it takes the next
    sequence, until the target's sequences are all done.

    ``check(status, body)`` sees every answer (status int, body bytes) and
    returns None when it is right, else a description: the first wrong
    answer stops the run with a RuntimeError naming it.

    Returns a ``Result``: requests, seconds, rate, statuses, latency_us,
    client_cpu_s and client_cpu_util (this process's CPU over the run),
    per_target (requests answered per target, in ``targets`` order).
    """
    ep = select.epoll()
    conns = {}
    socks = []
    queues = []
    try:
        for index, (host, port, connections, sequences) in enumerate(targets):
            queue = deque(sequences)
            queues.append(queue)
            for s in _connect(host, port, min(connections, max(1, len(queue)))):
                socks.append(s)
                # sock, buffer, target index, current sequence, next step, sent at
                conns[s.fileno()] = [s, bytearray(), index, None, 0, 0.0]
                ep.register(s.fileno(), select.EPOLLIN)
        lat = array("d")
        statuses = {}
        answered = [0] * len(targets)
        in_flight = 0
        cpu0 = _cpu()
        t0 = _perf()

        def start_next(c):
            """Send the first step of the target's next sequence, if any."""
            nonlocal in_flight
            queue = queues[c[2]]
            if not queue:
                c[3] = None
                return
            c[3] = queue.popleft()
            c[4] = 1
            c[5] = _perf()
            c[0].sendall(c[3][0])
            in_flight += 1

        for c in conns.values():
            start_next(c)
        last_answer = _perf()
        while in_flight:
            ready = ep.poll(0.2)
            now = _perf()
            if not ready and now - last_answer > drain_timeout:
                raise RuntimeError(f"{in_flight} requests unanswered for {drain_timeout}s")
            for fd, _ in ready:
                c = conns[fd]
                data = c[0].recv(262144)
                if not data:
                    raise RuntimeError(f"server of target {c[2]} closed a connection")
                buf = c[1]
                buf += data
                found = _response_end(buf)
                if found is None:
                    continue
                end, status = found
                problem = check(status, _body(buf, end))
                if problem is not None:
                    step = bytes(c[3][c[4] - 1].split(b"\r\n", 1)[0]).decode("latin-1")
                    raise RuntimeError(f"target {c[2]}, {step}: {problem}")
                del buf[:end]
                done = last_answer = _perf()
                lat.append(done - c[5])
                statuses[status] = statuses.get(status, 0) + 1
                answered[c[2]] += 1
                in_flight -= 1
                sequence = c[3]
                if c[4] < len(sequence):
                    c[5] = done
                    c[0].sendall(sequence[c[4]])
                    c[4] += 1
                    in_flight += 1
                else:
                    start_next(c)
        elapsed = _perf() - t0
        cpu = _cpu() - cpu0
    finally:
        ep.close()
        for s in socks:
            s.close()
    r = Result(requests=len(lat), seconds=elapsed, rate=len(lat) / elapsed if elapsed else 0.0,
               statuses={str(k): v for k, v in sorted(statuses.items())}, client_cpu_s=cpu,
               client_cpu_util=cpu / elapsed if elapsed else 0.0, connections=len(conns), per_target=answered)
    r["latency_us"] = {k: v * 1e6 for k, v in percentiles(lat).items()}
    return r
