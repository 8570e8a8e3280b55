package resume

import "fmt"

// txPipe holds the newest bytes of a send buffer in a kernel pipe instead
// of memory. Bulk that comes from a TCP socket by splice(2) and goes to a
// tcp link by splice(2) (spliceSend) must still be kept until the peer
// acknowledges it; tee(2) into this pipe keeps it without copying it into
// user space, and an acknowledgement drops it with a splice to /dev/null.
// Only when somebody must read the bytes back (a resend on a new link, a
// park, a snapshot, a write that takes the copy path) are they copied into
// the buffer's memory, by unpipe. In steady bulk that never happens: the
// peer acknowledges the bytes before they are needed.
//
// The pipe's pages are references to the pages the bytes arrived in. A
// sender that transmits a file with sendfile(2) over loopback and rewrites
// the file before lifeline has it acknowledged can have the new contents
// resent after a link failure; the kernel's own TCP retransmission of
// sendfile(2) data behaves the same way.
//
// The pipes form a chain (at most maxTxSegs, each holding up to its
// capacity in tees), so that a peer whose acknowledgements lag behind by a
// few hundred KiB, as on a loaded machine, does not force the copy.
//
// Guarded by session.mu, except that the borrower (lendPipe) tees into the
// last pipe's tail without it; bytes are only ever removed from the heads,
// under mu, so the two never touch the same bytes.
type txPipe struct {
	segs []txSeg // oldest first: the bytes of segs[i] precede segs[i+1]'s
	n    int     // bytes committed, in all of them
	lent bool    // a tee into the last pipe runs without the lock
	dead bool    // dropped while lent: the borrower closes the last pipe
}

// txSeg is one pipe of the chain.
type txSeg struct {
	p *rxPipe
	n int // bytes committed: [from, from+n) at the pipe's head
	// slots is the pipe's capacity in buffers, and ends the offsets after
	// each tee still (partly) in it: a tee adds at most teeSlots buffers,
	// so a pipe with fewer than slots-teeSlots in use takes the next one
	// whole (see lendPipe).
	slots int
	ends  []uint64
}

// maxTxSegs bounds the pipes of one send side.
const maxTxSegs = 4

// teeSlots is the most pipe buffers one tee adds: the source pipe's
// capacity (a default pipe, 16 pages), since tee copies buffer by buffer.
const teeSlots = 16

// pipeHole stands in for piped bytes in a batch that spliceSend sends by
// splice: collect lays out the frame, the payload never comes from here.
var pipeHole = make([]byte, 64<<10)

// piped is how many bytes the pipes hold.
func (t *sendSide) piped() int {
	if t.tx == nil {
		return 0
	}
	return t.tx.n
}

// End is the offset after the newest byte held, in memory or the pipe.
func (t *sendSide) End() uint64 { return t.ReplayBuffer.End() + uint64(t.piped()) }

// Len is the number of bytes held, in memory or the pipe.
func (t *sendSide) Len() int { return t.ReplayBuffer.Len() + t.piped() }

// Tail is ReplayBuffer.Tail after the pipe's bytes moved to memory: new
// bytes go after them.
func (t *sendSide) Tail() []byte {
	t.unpipe()
	return t.ReplayBuffer.Tail()
}

// Write appends p after what the pipe holds.
func (t *sendSide) Write(p []byte) {
	t.unpipe()
	t.ReplayBuffer.Write(p)
}

// Slices is ReplayBuffer.Slices over memory and pipe: piped bytes in the
// range are copied to memory first, unless hole is set (a splice send
// lays out its frame), when pipeHole stands in for them.
func (t *sendSide) Slices(dst [][]byte, from uint64, n int) [][]byte {
	mem := t.ReplayBuffer.End()
	if t.tx == nil || from+uint64(n) <= mem {
		return t.ReplayBuffer.Slices(dst, from, n)
	}
	if !t.hole {
		t.unpipe()
		return t.ReplayBuffer.Slices(dst, from, n)
	}
	if from < mem {
		dst = t.ReplayBuffer.Slices(dst, from, int(mem-from))
		n -= int(mem - from)
	}
	for n > 0 {
		k := min(n, len(pipeHole))
		dst = append(dst, pipeHole[:k])
		n -= k
	}
	return dst
}

// Discard drops the bytes below upto, from memory and then from the pipe.
func (t *sendSide) Discard(upto uint64) {
	mem := t.ReplayBuffer.End()
	if t.tx == nil || upto <= mem {
		t.ReplayBuffer.Discard(upto)
		return
	}
	upto = min(upto, t.End())
	t.ReplayBuffer.Discard(mem)
	k := int(upto - mem)
	t.ReplayBuffer.Skip(k)
	t.acct.charge(-int64(k))
	tx := t.tx
	tx.n -= k
	for k > 0 {
		sg := &tx.segs[0]
		d := min(k, sg.n)
		if d == 0 {
			panic("resume: send pipes hold fewer bytes than counted")
		}
		if err := dropFromPipe(sg.p, d); err != nil {
			panic(fmt.Sprintf("resume: %v", err)) // the pipe holds them: a bug
		}
		sg.n -= d
		k -= d
		i := 0
		for i < len(sg.ends) && sg.ends[i] <= upto {
			i++
		}
		sg.ends = append(sg.ends[:0], sg.ends[i:]...)
		if sg.n == 0 && len(tx.segs) > 1 {
			putTxPipe(sg.p)
			tx.segs = append(tx.segs[:0], tx.segs[1:]...)
		}
	}
	t.maybeReturnPipe()
}

// Compact is ReplayBuffer.Compact after the pipe's bytes moved to memory:
// a parked session holds no pipe.
func (t *sendSide) Compact() {
	t.unpipe()
	t.ReplayBuffer.Compact()
}

// Drop empties the buffer, pipes included.
func (t *sendSide) Drop() {
	n := t.piped()
	if tx := t.tx; tx != nil {
		t.acct.charge(-int64(tx.n))
		tx.n = 0
		last := len(tx.segs) - 1
		for i := range tx.segs[:last] {
			tx.segs[i].p.close() // may hold bytes
		}
		tx.segs = append(tx.segs[:0], tx.segs[last])
		tx.segs[0].n, tx.segs[0].ends = 0, nil
		if tx.lent {
			tx.dead = true // the borrower closes the last one
		} else {
			t.freePipe(false)
		}
	}
	t.ReplayBuffer.Drop()
	t.ReplayBuffer.end += uint64(n)
	t.ReplayBuffer.start, t.ReplayBuffer.base = t.ReplayBuffer.end, t.ReplayBuffer.end
}

// unpipe copies what the pipes hold into memory, after the bytes there,
// and lets go of them (but the last, while a tee into it runs).
// Reading a pipe that holds the bytes cannot fail short of a bug, which
// would leave a gap in the stream: that panics rather than go on.
func (t *sendSide) unpipe() {
	tx := t.tx
	if tx == nil {
		return
	}
	t.acct.charge(-int64(tx.n)) // the chunks charge for themselves
	tx.n = 0
	for i := range tx.segs {
		sg := &tx.segs[i]
		for left := sg.n; left > 0; {
			tail := t.ReplayBuffer.Tail()
			tail = tail[:min(len(tail), left)]
			if err := readPipe(sg.p, tail); err != nil {
				panic(fmt.Sprintf("resume: %v", err))
			}
			t.ReplayBuffer.Commit(len(tail))
			left -= len(tail)
		}
		sg.n, sg.ends = 0, sg.ends[:0]
	}
	last := len(tx.segs) - 1
	for i := range tx.segs[:last] {
		putTxPipe(tx.segs[i].p)
	}
	tx.segs = append(tx.segs[:0], tx.segs[last])
	t.maybeReturnPipe()
}

// maybeReturnPipe gives an empty pipe nobody borrows back to the pool.
func (t *sendSide) maybeReturnPipe() {
	if tx := t.tx; tx != nil && tx.n == 0 && !tx.lent {
		t.freePipe(true)
	}
}

// freePipe lets go of the one pipe left: back to the pool if empty, else
// closed.
func (t *sendSide) freePipe(empty bool) {
	p := t.tx.segs[0].p
	if empty {
		putTxPipe(p)
	} else {
		p.close()
	}
	t.tx = nil
}

// lendPipe returns the pipe the next bytes (at End, one tee) may be teed
// into without the lock, taking one if there is none; nil: copy them
// instead. The pipe then has room for a whole tee: if the chain may not,
// what it holds moves to memory first. The caller must call commitPipe.
func (t *sendSide) lendPipe() *rxPipe {
	if t.ReplayBuffer.lent || t.shut {
		return nil
	}
	if t.tx == nil {
		p, slots := getTxPipe()
		if p == nil {
			return nil
		}
		t.tx = &txPipe{segs: []txSeg{{p: p, slots: slots}}}
	}
	tx := t.tx
	if tx.lent || tx.dead {
		return nil
	}
	if last := &tx.segs[len(tx.segs)-1]; (len(last.ends)+1)*teeSlots > last.slots {
		var p *rxPipe
		var slots int
		if len(tx.segs) < maxTxSegs {
			p, slots = getTxPipe()
		}
		if p != nil {
			tx.segs = append(tx.segs, txSeg{p: p, slots: slots})
		} else {
			t.unpipe() // the one copy, when acknowledgements fall behind
			if t.tx == nil {
				return t.lendPipe()
			}
		}
	}
	tx.lent = true
	return tx.segs[len(tx.segs)-1].p
}

// commitPipe ends a loan of lendPipe: m of the bytes were teed into the
// pipe and are the next bytes of the stream when keep is set; otherwise
// they are thrown away (the session refused them). It reports whether the
// pipe was dropped meanwhile (then the bytes are gone with it).
func (t *sendSide) commitPipe(m int, keep bool) (dead bool) {
	tx := t.tx
	if tx.dead {
		tx.segs[0].p.close()
		t.tx = nil
		return true
	}
	if !keep && m > 0 {
		// They sit behind the committed bytes: move those to memory and
		// close the last pipe with the rest (lent, unpipe keeps it).
		t.unpipe()
		tx.lent = false
		t.freePipe(false)
		return false
	}
	tx.lent = false
	if m > 0 {
		last := &tx.segs[len(tx.segs)-1]
		last.n += m
		tx.n += m
		t.acct.charge(int64(m)) // a shared Budget counts piped bytes too
		last.ends = append(last.ends, t.End())
	}
	t.maybeReturnPipe()
	return false
}
