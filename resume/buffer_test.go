package resume

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// content is what Slices says the buffer holds.
func content(b *ReplayBuffer) []byte {
	var out []byte
	for _, seg := range b.Slices(nil, b.Start(), b.Len()) {
		out = append(out, seg...)
	}
	return out
}

// The buffer against a model (a plain byte slice) through random writes,
// discards, reads, empty loans and compactions: the bytes held, their
// offsets and the budget's charge agree after every step.
func TestReplayBufferCompactModel(t *testing.T) {
	for seed := range uint64(8) {
		r := rand.New(rand.NewPCG(seed, 7))
		acct := NewBudget(0)
		b := ReplayBuffer{acct: acct}
		var model []byte // the bytes [start, end)
		var start, end uint64
		compacted := 0
		for step := range 1500 {
			switch op := r.IntN(10); {
			case op < 3:
				p := stream(seed<<20|uint64(step), r.IntN(3*compactMax))
				b.Write(p)
				model = append(model, p...)
				end += uint64(len(p))
			case op < 5:
				k := r.IntN(len(model) + 1)
				b.Discard(start + uint64(k))
				model = model[k:]
				start += uint64(k)
			case op < 6:
				p := make([]byte, r.IntN(len(model)+1))
				if n := b.Read(p); n != len(p) || !bytes.Equal(p, model[:n]) {
					t.Fatalf("seed %d step %d: Read %d of %d, equal %v", seed, step, n, len(p), bytes.Equal(p[:n], model[:n]))
				}
				model = model[len(p):]
				start += uint64(len(p))
			case op < 7:
				b.Tail()
				b.Commit(0)
			default:
				before := b.spill != nil
				b.Compact()
				if !before && b.spill != nil {
					compacted++
				}
				if b.Len() > 0 && b.Len() <= compactMax && (b.spill == nil || len(b.chunks) != 0) {
					t.Fatalf("seed %d step %d: %d bytes after Compact in %d chunks, spill %v", seed, step, b.Len(), len(b.chunks), b.spill != nil)
				}
			}
			if b.Start() != start || b.End() != end || !bytes.Equal(content(&b), model) {
				t.Fatalf("seed %d step %d: [%d, %d) held, want [%d, %d); bytes equal %v", seed, step, b.Start(), b.End(), start, end, bytes.Equal(content(&b), model))
			}
			if b.Len() == 0 && b.spill != nil {
				t.Fatalf("seed %d step %d: an empty buffer keeps a spill", seed, step)
			}
			if acct.InUse() != b.held() {
				t.Fatalf("seed %d step %d: budget charged %d, buffer holds %d", seed, step, acct.InUse(), b.held())
			}
		}
		if compacted == 0 {
			t.Fatalf("seed %d: no step compacted", seed)
		}
		b.Drop()
		if acct.InUse() != 0 {
			t.Fatalf("seed %d: %d still charged after Drop", seed, acct.InUse())
		}
	}
}

// Compact leaves alone a buffer that holds more than compactMax or whose
// tail is lent; it does not touch the chunks it leaves, so a slice a
// writer took before keeps its bytes.
func TestReplayBufferCompactLimits(t *testing.T) {
	var b ReplayBuffer
	big := stream(1, compactMax+1)
	b.Write(big)
	b.Compact()
	if b.spill != nil || len(b.chunks) != 1 {
		t.Fatalf("%d bytes compacted (spill %v, %d chunks); the most is %d", len(big), b.spill != nil, len(b.chunks), compactMax)
	}
	b.Discard(b.Start() + 1)
	taken := b.Slices(nil, b.Start(), b.Len()) // a writer's batch
	b.Tail()                                   // a reader fills the tail outside the lock
	b.Compact()
	if b.spill != nil {
		t.Fatal("compacted under a lent tail")
	}
	b.Commit(0)
	b.Compact()
	if b.spill == nil || b.chunks != nil {
		t.Fatalf("%d bytes not compacted (%d chunks)", b.Len(), len(b.chunks))
	}
	if !bytes.Equal(taken[0], big[1:]) {
		t.Fatal("a slice taken before Compact changed")
	}
	// Writing again moves the bytes back into a chunk, after them.
	b.Write([]byte("more"))
	if b.spill != nil || len(b.chunks) != 1 || !bytes.Equal(content(&b), append(append([]byte{}, big[1:]...), "more"...)) {
		t.Fatalf("after a write: spill %v, %d chunks, content equal %v", b.spill != nil, len(b.chunks), bytes.Equal(content(&b), append(append([]byte{}, big[1:]...), "more"...)))
	}
}

// A session parked with bytes unacknowledged in both directions keeps
// those bytes and no chunk, and replays them byte-exact when it resumes.
func TestParkedSessionKeepsBytesNotChunks(t *testing.T) {
	cfg := testConfig()
	var refuse atomic.Bool
	var mu sync.Mutex
	var links []*faultConn
	e := memEnv(t, serverConfig(cfg), func(c net.Conn) net.Conn {
		if refuse.Load() {
			c.Close() // the attempt fails in its handshake
			return c
		}
		f := newFaultConn(c, 1<<40, faultBlackhole)
		mu.Lock()
		links = append(links, f)
		mu.Unlock()
		return f
	})
	defer e.stop()
	c, s := e.pair(cfg)
	defer closeBoth(c, s)
	roundTrip(t, c, s, "a first exchange")
	roundTrip(t, s, c, "and its answer")
	waitFor(t, 5*time.Second, "the exchange acknowledged", func() bool { return unacked(c) == 0 && unacked(s) == 0 })

	// The path goes silent: both sides' next bytes are lost with it.
	mu.Lock()
	first := links[0]
	mu.Unlock()
	first.breakNow()
	req, resp := "a request lost with the link", "an answer lost with it"
	if _, err := c.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write([]byte(resp)); err != nil {
		t.Fatal(err)
	}
	taken := func(x *Conn) bool {
		x.s.mu.Lock()
		defer x.s.unlock()
		return x.s.send.next == x.s.send.End()
	}
	waitFor(t, 5*time.Second, "both writers to take their bytes", func() bool { return taken(c) && taken(s) })
	refuse.Store(true)
	first.Conn.Close()
	parked := func(x *Conn) bool {
		x.s.mu.Lock()
		defer x.s.unlock()
		return x.s.link == nil
	}
	waitFor(t, 5*time.Second, "both sides to lose the link", func() bool { return parked(c) && parked(s) })
	for _, x := range []struct {
		name string
		c    *Conn
		want string
	}{{"client", c, req}, {"gateway", s, resp}} {
		x.c.s.mu.Lock()
		sb := &x.c.s.send.ReplayBuffer
		chunks, spill, held := len(sb.chunks), sb.spill != nil, string(content(sb))
		x.c.s.mu.Unlock()
		if chunks != 0 || !spill || held != x.want {
			t.Fatalf("%s parked: %d chunks, spill %v, holding %q; want no chunk and a spill of %q", x.name, chunks, spill, held, x.want)
		}
	}

	refuse.Store(false)
	got := make([]byte, len(req))
	if _, err := io.ReadFull(s, got); err != nil || string(got) != req {
		t.Fatalf("gateway read %q, %v after the resume; want %q", got, err, req)
	}
	got = make([]byte, len(resp))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != resp {
		t.Fatalf("client read %q, %v after the resume; want %q", got, err, resp)
	}
	bulk := stream(9, 3*chunkSize+17)
	go c.Write(bulk)
	got = make([]byte, len(bulk))
	if _, err := io.ReadFull(s, got); err != nil || !bytes.Equal(got, bulk) {
		t.Fatalf("bulk after the resume: %v, equal %v", err, bytes.Equal(got, bulk))
	}
	waitFor(t, 5*time.Second, "everything acknowledged", func() bool { return unacked(c) == 0 })
	c.s.mu.Lock()
	n, chunks, spill := c.s.send.Len(), len(c.s.send.chunks), c.s.send.spill != nil
	c.s.mu.Unlock()
	if n != 0 || chunks != 0 || spill {
		t.Fatalf("acknowledged, the client still holds %d bytes, %d chunks, spill %v", n, chunks, spill)
	}
}
