//go:build linux

package resume

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/lifeline-proxy/lifeline/frame"
)

// spliceSend is one step of ReadFrom for bulk from a TCP socket over a
// tcp link: the bytes go into the replay buffer with one copy, and to the
// link without a second one.
//
//  1. splice source -> pipe A, waiting in the poller for the source (its
//     read deadline applies, so a hand-over's stop returns at once);
//  2. tee A -> pipe B: B now holds the same pages, nothing copied;
//  3. read A into the replay buffer (the one copy) and commit: from here
//     on the bytes are the session's, replayed on the next link if this
//     one fails, as any written byte is;
//  4. under mu, if the bytes are the next due on the link and the writer
//     is free: become the writer, collect what is due (control frames,
//     then one DATA frame with exactly these bytes), send the frame
//     headers with MSG_MORE and splice B -> link for the payload, waiting
//     in the poller for the link;
//  5. otherwise B is dropped and the bytes go as written bytes do.
//
// n is what was read from the source, err the source's error (io.EOF at
// its FIN; errSourceEmpty, nothing read, if nowait and it had nothing),
// werr the session's (closed meanwhile: the bytes were dropped).
// A link that fails in step 4 fails as in a writer goroutine: the bytes
// are in the replay buffer.
func (s *session) spliceSend(src syscall.RawConn, max int, nowait bool) (n int, err, werr error) {
	a, k, err := spliceIn(src, max, "source", nowait)
	if k == 0 {
		if err == nil {
			err = io.EOF
		}
		if errors.Is(err, errNoPipe) {
			err = nil // try again the ordinary way (bulk is now off)
		}
		return 0, err, nil
	}
	if k >= txBulkMin {
		s.mu.Lock()
		rp := s.send.lendPipe()
		s.unlock()
		if rp != nil {
			return s.spliceSendPiped(a, rp, k)
		}
	}
	var b *rxPipe
	if k >= txBulkMin {
		if b, _ = getPipe(); b != nil {
			if m, terr := teePipe(a, b, k); terr != nil || m != k {
				b.close() // may hold some: never reused
				b = nil
			}
		}
	}
	from, werr := s.commitFromPipe(a, k)
	if werr != nil {
		if b != nil {
			b.close()
		}
		return k, nil, werr
	}
	s.mu.Lock()
	l := s.claimSpliceWriter(from, k, b != nil)
	if l == nil {
		if b != nil {
			b.close()
		}
		s.sendCommitted(true)
		s.unlock()
		return k, nil, nil
	}
	l.collect()
	s.unlock()
	s.finishSpliced(l, b, k)
	return k, nil, nil
}

// spliceSendPiped goes on with the k bytes in pipe a when the send
// buffer lent its pipe rp: tee a -> rp keeps them as the session's (no
// copy), and a itself goes to the link. A tee that takes less than all
// (it should not: lendPipe made room) leaves the rest to the copy path.
func (s *session) spliceSendPiped(a, rp *rxPipe, k int) (n int, err, werr error) {
	m, terr := teePipe(a, rp, k)
	if terr != nil {
		m = 0
	}
	s.mu.Lock()
	werr = s.writeErr()
	keep := werr == nil || werr == ErrFrozen
	if s.send.commitPipe(m, keep) && werr == nil {
		werr = ErrConnClosed // dropped, so closed: cannot be otherwise
	}
	if !keep || (werr != nil && werr != ErrFrozen) {
		s.unlock()
		a.close()
		return k, nil, werr
	}
	if m < k {
		s.unlock()
		if err := dropFromPipe(a, m); err != nil {
			s.mu.Lock()
			s.abort(frame.CodeInternal, err.Error())
			werr = s.writeErr()
			s.unlock()
			a.close()
			return k, nil, werr
		}
		if _, werr = s.commitFromPipe(a, k-m); werr != nil {
			return k, nil, werr
		}
		s.mu.Lock()
		s.sendCommitted(true)
		s.unlock()
		return k, nil, nil
	}
	l := s.claimSpliceWriter(s.send.End()-uint64(k), k, true)
	if l == nil {
		s.sendCommitted(true) // from the buffer: unpiped as collect reads it
		s.unlock()
		a.close()
		return k, nil, nil
	}
	s.send.hole = true
	l.collect()
	s.send.hole = false
	s.unlock()
	s.finishSpliced(l, a, k)
	return k, nil, nil
}

// finishSpliced sends the batch the writer l collected, whose last k
// payload bytes pipe b holds, and ends l's turn.
func (s *session) finishSpliced(l *link, b *rxPipe, k int) {
	if serr := l.sendSpliced(b, k); serr != nil {
		b.close()
		l.unpin()
		s.linkFailed(l, serr)
		l.close()
		l.writerExit(true)
		return
	}
	putPipe(b)
	s.mu.Lock()
	s.stats.BytesSplicedOut += uint64(k)
	s.unlock()
	l.unpin()
	l.sendInline() // whatever else became due meanwhile; ends our turn
}

// commitFromPipe reads the k bytes pipe p holds into the replay buffer
// and commits them, returning the offset of the first; then p goes back
// to the pool. werr: the session was closed meanwhile, and the bytes were
// dropped (frozen ones are kept: they go to the next process).
func (s *session) commitFromPipe(p *rxPipe, k int) (from uint64, werr error) {
	s.mu.Lock()
	from = s.send.End()
	for left := k; left > 0; {
		if err := s.writeErr(); err != nil && err != ErrFrozen {
			s.unlock()
			p.close()
			return from, err
		}
		tail := s.send.Tail()
		tail = tail[:min(len(tail), left)]
		s.unlock()
		rerr := readPipe(p, tail)
		s.mu.Lock()
		if rerr != nil {
			// Cannot happen (the pipe holds k bytes): the bytes are gone
			// from the source, so the stream cannot go on without a gap.
			s.send.Commit(0)
			s.abort(frame.CodeInternal, rerr.Error())
			werr = s.writeErr()
			s.unlock()
			p.close()
			return from, werr
		}
		s.send.Commit(len(tail))
		left -= len(tail)
	}
	s.unlock()
	putPipe(p)
	return from, nil
}

// claimSpliceWriter makes the caller the current link's writer for
// sending the k bytes at from through the splice path: they must be the
// next due, all within the peer's window, and no writer may be running.
// nil: send them as written bytes. Caller holds mu.
func (s *session) claimSpliceWriter(from uint64, k int, piped bool) *link {
	l := s.link
	if !piped || l == nil || l.rc == nil || l.spliceRC == nil || l.final ||
		s.send.next != from || s.send.End() != from+uint64(k) || s.send.window < s.send.End() {
		return nil
	}
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if l.writing || l.wDone || !l.wStarted || l.wPrev != nil {
		return nil
	}
	l.writing = true
	return l
}

// txSpliceRoom is how much the splice path may read now (at most room,
// one DATA frame, what the peer's window takes), or 0 for not now (the
// link is not tcp, bytes are waiting to be sent). busy, if not nil, is
// closed when the writer that is sending the bytes before ours returns:
// bulk waits for it rather than queue the next bytes behind it, which
// would keep the writer busy and every later read off the splice path.
// Caller holds mu.
func (s *session) txSpliceRoom(room int) (n int, busy chan struct{}) {
	l := s.link
	if l == nil || l.rc == nil || l.spliceRC == nil || l.final || s.send.window <= s.send.End() {
		return 0, nil
	}
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if l.writing {
		if l.idle == nil {
			l.idle = make(chan struct{})
		}
		return 0, l.idle
	}
	if s.send.next != s.send.End() || l.wDone || !l.wStarted || l.wPrev != nil {
		return 0, nil
	}
	n = min(room, frame.MaxPayload, int(min(s.send.window-s.send.End(), frame.MaxPayload)))
	if n < txBulkMin {
		return 0, nil
	}
	return n, nil
}

// sendSpliced writes what collect gathered, l.segs: its last segments are
// the k payload bytes that pipe b holds, which go by splice instead.
func (l *link) sendSpliced(b *rxPipe, k int) error {
	head := l.segs
	for left := k; left > 0; {
		last := head[len(head)-1]
		if len(last) > left {
			return fmt.Errorf("resume: splice send: payload segments do not end the batch")
		}
		left -= len(last)
		head = head[:len(head)-1]
	}
	for _, h := range head {
		if err := sendMore(l.rc, h); err != nil {
			return err
		}
	}
	return spliceToLink(l.rc, b, k)
}

// sendMore writes all of h to the socket with MSG_MORE (the payload
// follows), waiting in the poller when the socket is full.
func sendMore(rc syscall.RawConn, h []byte) error {
	var err error
	if rerr := rc.Write(func(fd uintptr) bool {
		for len(h) > 0 {
			var m int
			m, err = unix.SendmsgN(int(fd), h, nil, nil, unix.MSG_MORE|unix.MSG_NOSIGNAL)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				err = nil
				return false
			case err != nil:
				return true
			}
			h = h[m:]
		}
		return true
	}); rerr != nil {
		return rerr
	}
	if err != nil {
		return fmt.Errorf("resume: send to link: %w", err)
	}
	return nil
}

// spliceToLink moves the k bytes pipe b holds to the socket, waiting in
// the poller when it is full.
func spliceToLink(rc syscall.RawConn, b *rxPipe, k int) error {
	var err error
	if rerr := rc.Write(func(fd uintptr) bool {
		for k > 0 {
			var m int64
			m, err = splice(b.r, int(fd), k)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				err = nil
				return false
			case err != nil:
				return true
			case m == 0:
				err = io.ErrUnexpectedEOF // the pipe had fewer than k bytes
				return true
			}
			k -= int(m)
		}
		return true
	}); rerr != nil {
		return rerr
	}
	if err != nil {
		return fmt.Errorf("resume: splice to link: %w", err)
	}
	return nil
}

// teePipe duplicates the n bytes at the front of a into the empty b.
func teePipe(a, b *rxPipe, n int) (int, error) {
	for {
		m, err := unix.Tee(a.r, b.w, n, unix.SPLICE_F_NONBLOCK)
		if err != unix.EINTR {
			return int(m), err
		}
	}
}

// txPipeSize is what a send buffer's pipe asks for (F_SETPIPE_SZ; 1 MiB
// is the default pipe-max-size): about 16 tees of 64 KiB, room for what
// a peer acknowledging every BufferSize/4 leaves unacknowledged. When
// the user's pipe quota (pipe-user-pages-soft) is used up the kernel
// refuses and the pipe keeps its default size: one tee at a time.
const txPipeSize = 1 << 20

// maxIdleTxPipes bounds the send buffer pipes kept for reuse.
const maxIdleTxPipes = 8

// maxTxPipesOpen: no send buffer takes a new pipe while this many pipes
// are open in the process (2 descriptors each); bulk then copies. Pipes
// are only held while bulk is in flight, but descriptors are what a
// gateway's sessions run out of first.
const maxTxPipesOpen = 512

// maxTxPipePages caps the pages of all send buffer pipes of the process
// (see txPageCap), so that they never use up the user's pipe quota.
// Past pipe-user-pages-soft (16384 pages by default, 64 pipes of 1 MiB)
// the kernel gives every new pipe of a non-root user 2 pages, the receive
// pipes (link.spliceData) included, and those would then move 8 KiB per
// splice. Half the quota is left to the receive pipes and to whatever
// else runs as the user; past the cap a send buffer copies, as it does
// without pipes.
var maxTxPipePages = txPageCap()

// txPageCap is half of pipe-user-pages-soft, and at most 8192 pages
// (32 MiB: 32 busy sessions sending bulk at once, each with its 1 MiB
// pipe). A quota of 0 (none) or one that cannot be read gives 8192.
func txPageCap() int {
	const most = 8192
	b, err := os.ReadFile("/proc/sys/fs/pipe-user-pages-soft")
	if err != nil {
		return most
	}
	soft, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || soft <= 0 {
		return most
	}
	return min(most, soft/2)
}

var txPool struct {
	mu   sync.Mutex
	free []*rxPipe // empty, each with its pages set
}

// getTxPipe returns an empty pipe for a send buffer and its capacity in
// buffers, or nil (out of descriptors: copy instead).
func getTxPipe() (*rxPipe, int) {
	txPool.mu.Lock()
	if n := len(txPool.free); n > 0 {
		p := txPool.free[n-1]
		txPool.free = txPool.free[:n-1]
		txPool.mu.Unlock()
		return p, p.pages
	}
	txPool.mu.Unlock()
	pipePool.mu.Lock()
	defer pipePool.mu.Unlock()
	pageSize := os.Getpagesize()
	if pipePool.open >= maxTxPipesOpen || pipePool.txPages+txPipeSize/pageSize > maxTxPipePages {
		return nil, 0
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, 0
	}
	pipePool.open++
	p := &rxPipe{r: fds[0], w: fds[1]}
	size, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, txPipeSize)
	if err != nil {
		size, err = unix.FcntlInt(uintptr(p.w), unix.F_GETPIPE_SZ, 0)
	}
	if err != nil || size < teeSlots*pageSize {
		p.closeLocked()
		return nil, 0
	}
	p.pages = size / pageSize
	pipePool.txPages += p.pages
	return p, p.pages
}

// putTxPipe gives back an empty send buffer pipe.
func putTxPipe(p *rxPipe) {
	txPool.mu.Lock()
	if len(txPool.free) < maxIdleTxPipes {
		txPool.free = append(txPool.free, p)
		txPool.mu.Unlock()
		return
	}
	txPool.mu.Unlock()
	p.close()
}

var devNull struct {
	once sync.Once
	fd   int
	err  error
}

// dropFromPipe throws away the n bytes at the front of p: a splice to
// /dev/null, which copies nothing.
func dropFromPipe(p *rxPipe, n int) error {
	devNull.once.Do(func() {
		devNull.fd, devNull.err = unix.Open("/dev/null", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	})
	if devNull.err != nil {
		return fmt.Errorf("resume: open /dev/null: %w", devNull.err)
	}
	for n > 0 {
		m, err := splice(p.r, devNull.fd, n)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return fmt.Errorf("resume: drop from send pipe: %w", err)
		case m == 0:
			return fmt.Errorf("resume: send pipe ended with %d bytes to drop", n)
		}
		n -= int(m)
	}
	return nil
}
