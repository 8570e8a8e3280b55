package resume

import (
	"errors"
	"io"

	"github.com/lifeline-proxy/lifeline/frame"
)

// errNoPipe: no pipe could be had for a splice (out of descriptors, say);
// the reader copies instead.
var errNoPipe = errors.New("resume: no pipe for splice")

// errSourceEmpty: a splice that was not to wait found the source empty.
var errSourceEmpty = errors.New("resume: source not readable")

// spliceData moves one step of a DATA payload (what the pipe takes, at
// most n bytes) from a tcp link's socket to the sink's TCP socket with
// splice(2), so the bytes never pass through user space. handled false:
// the session cannot take this path now (no sink, bytes waiting in the
// receive buffer, a pump running, ...) and nothing was read; copy instead.
//
// The step, the pipe empty at its start and its end:
//
//  1. splice link -> pipe, waiting in the poller for the link (its read
//     deadline applies, so a retired link's reader returns at once);
//  2. under mu, if the link is still attached and the reader can be the
//     sink's pump: the bytes count as received (recv.Skip), as a Commit
//     would count them, so that an ACK or a resume point includes them;
//     otherwise they are copied out of the pipe into the receive buffer
//     as the copy path would read them;
//  3. splice pipe -> application without waiting; what it does not take
//     now is read out of the pipe into the receive buffer (recv.PutBack)
//     and written by the pump as today. The reader never blocks on the
//     application, so ACKs and PINGs keep flowing.
//
// Bytes in the pipe were read off the link: they reach the application or
// the receive buffer, or, if the link was detached before step 2 counted
// them, are dropped as the copy path drops what it read for a link no
// longer attached (the next link resends them from recv.End()). Holding
// rmu from step 2 to the end makes a Snapshot wait for the step, so a
// hand-over never sees bytes in a pipe.
func (l *link) spliceData(n int) (int, bool, error) {
	s := l.s
	s.mu.Lock()
	ok := s.link == l && s.sink != nil && s.sink.sp != nil && !s.sink.running && !s.sink.ended &&
		!s.recv.shut && !s.recv.fin && s.recv.Len() == 0 && s.recv.End() == l.rxOff &&
		l.rxOff+uint64(n) <= s.recv.window
	s.unlock()
	if !ok {
		return 0, false, nil
	}
	p, k, err := spliceIn(l.spliceRC, n, "link", false)
	if k == 0 {
		if errors.Is(err, errNoPipe) { // out of descriptors, say: copy
			return 0, false, nil
		}
		if err == nil {
			err = io.ErrUnexpectedEOF // the link ended inside a frame
		}
		return 0, true, err
	}
	if terr := l.fr.DataTaken(k); terr != nil {
		p.close()
		return k, true, terr // cannot happen: nothing was buffered
	}

	s.mu.Lock()
	if s.link != l {
		s.unlock()
		p.close() // drops what it holds: not counted, the next link resends it
		return k, true, errStale
	}
	sk := s.sink
	direct := sk != nil && sk.sp != nil && !s.recv.shut && s.recv.Len() == 0 && s.claimSink()
	if direct && !s.rmu.TryLock() { // a Snapshot waits for readers
		sk.running = false // under mu all along: no wake-up was missed
		direct = false
	}
	if !direct {
		s.unlock()
		return k, true, l.drainPipe(p, k)
	}
	s.recv.Skip(k)
	l.rxOff += uint64(k)
	l.firstByte()
	if s.recv.End()-s.recv.ackedTo >= s.ackThreshold() {
		s.kick()
	} else {
		s.armAck()
	}
	s.unlock()

	m := spliceOut(sk.sp, p, k)
	var chunks []*[chunkSize]byte
	var rerr error
	for left := k - m; left > 0; left -= chunkSize {
		c := chunkPool.Get().(*[chunkSize]byte)
		chunks = append(chunks, c)
		if rerr = readPipe(p, c[:min(left, chunkSize)]); rerr != nil {
			break
		}
	}
	if rerr != nil {
		p.close()
	} else {
		putPipe(p)
	}

	s.mu.Lock()
	sk.total += int64(m)
	s.stats.BytesSpliced += uint64(m)
	switch {
	case rerr != nil:
		// Counted as received, maybe acknowledged, and gone: the stream
		// cannot go on without a gap.
		for _, c := range chunks {
			chunkPool.Put(c)
		}
		s.abort(frame.CodeInternal, rerr.Error())
	case len(chunks) == 0:
	case s.recv.shut || s.aborted || s.state == StateClosed:
		// Dropped by Close, an abort or a release meanwhile.
		for _, c := range chunks {
			chunkPool.Put(c)
		}
	default:
		s.recv.PutBack(chunks, k-m)
		s.wakeReaders()
	}
	s.advertise()
	s.pumpInlineLocked(sk) // releases mu and rmu
	if rerr != nil {
		return k, true, rerr
	}
	return k, true, nil
}

// drainPipe moves the k bytes in the pipe into the receive buffer as the
// copy path would read them from the link, then gives the pipe back.
func (l *link) drainPipe(p *rxPipe, k int) error {
	for k > 0 {
		c, err := l.copyStep(k, func(b []byte) (int, error) {
			if err := readPipe(p, b); err != nil {
				return 0, err
			}
			return len(b), nil
		})
		k -= c
		if err != nil {
			p.close() // may hold bytes
			return err
		}
	}
	putPipe(p)
	return nil
}
