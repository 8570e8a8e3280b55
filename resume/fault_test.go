package resume

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// stream returns n deterministic pseudo-random bytes for a seed.
func stream(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// writeRandomly writes data in random-sized pieces.
func writeRandomly(w io.Writer, data []byte, r *rand.Rand) error {
	for len(data) > 0 {
		n := min(len(data), 1+r.IntN(48<<10))
		if _, err := w.Write(data[:n]); err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

// TestRandomFaults runs many sessions with random data both ways over
// links that break at random byte positions (mid-frame too), by close,
// reset or blackhole, with gateway-initiated migrations and client-side
// kills racing them. Every stream is compared byte for byte, and its end
// (EOF after half-close, or the reset) is checked.
func TestRandomFaults(t *testing.T) {
	const sessions = 16
	minFailures := 1000
	if testing.Short() {
		minFailures = 200
	}
	cfg := testConfig()
	cfg.PingInterval = 20 * time.Millisecond
	cfg.LivenessTimeout = 150 * time.Millisecond
	cfg.ReconnectTimeout = 30 * time.Second
	cfg.LingerTimeout = 30 * time.Second
	cfg.BufferSize = 256 << 10
	cfg.DisconnectedBufferSize = 1 << 20

	srvLogs := &syncBuffer{}
	scfg := *cfg
	scfg.Logger = slog.New(slog.NewTextHandler(srvLogs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	var failures atomic.Int64
	var modes [numFaultModes]atomic.Int64
	e := tcpEnv(t, serverConfig(&scfg), func(c net.Conn) net.Conn {
		m := faultMode(rand.IntN(int(numFaultModes)))
		// Blackholes cost a liveness timeout each: fewer of them.
		if m == faultBlackhole && rand.IntN(4) != 0 {
			m = faultClose
		}
		modes[m].Add(1)
		return newFaultConn(c, 512+rand.Int64N(40<<10), m)
	})
	defer e.stop()

	acc := startAcceptor(e.srv)
	var wg sync.WaitGroup
	errs := make(chan error, sessions*4)
	for i := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- runFaultSession(e, acc, cfg, uint64(i), i%5 == 4, &failures)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
			if id := sessionIn(err.Error()); id != "" {
				for _, line := range strings.Split(srvLogs.String(), "\n") {
					if strings.Contains(line, id) {
						t.Log("gateway: " + line)
					}
				}
			}
		}
	}
	t.Logf("link failures survived: %d (close %d, reset %d, blackhole %d links)", failures.Load(),
		modes[faultClose].Load(), modes[faultReset].Load(), modes[faultBlackhole].Load())
	if failures.Load() < int64(minFailures) {
		t.Errorf("only %d link failures; want at least %d", failures.Load(), minFailures)
	}
}

// acceptor pairs server-side Conns with their clients by session id.
type acceptor struct {
	mu   sync.Mutex
	byID map[SessionID]chan *Conn
}

func startAcceptor(srv *Server) *acceptor {
	a := &acceptor{byID: map[SessionID]chan *Conn{}}
	go func() {
		for {
			s, err := srv.Accept()
			if err != nil {
				return
			}
			a.ch(s.SessionID()) <- s
		}
	}()
	return a
}

func (a *acceptor) ch(id SessionID) chan *Conn {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := a.byID[id]
	if c == nil {
		c = make(chan *Conn, 1)
		a.byID[id] = c
	}
	return c
}

func (a *acceptor) get(id SessionID) (*Conn, error) {
	select {
	case s := <-a.ch(id):
		return s, nil
	case <-time.After(10 * time.Second):
		return nil, fmt.Errorf("session %v never accepted", id)
	}
}

func runFaultSession(e *env, acc *acceptor, cfg *Config, id uint64, abort bool, failures *atomic.Int64) error {
	r := rand.New(rand.NewPCG(id, 7))
	up := stream(id*2+1, 256<<10+r.IntN(1<<20))
	down := stream(id*2+2, 256<<10+r.IntN(1<<20))
	var logs *syncBuffer
	if abort {
		logs = &syncBuffer{}
		cfg2 := *cfg
		cfg2.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		cfg = &cfg2
	}
	var c *Conn
	var err error
	for try := 0; ; try++ { // the first link may break inside HELLO
		c, err = Dial(context.Background(), e.dial, "fault", cfg)
		if err == nil || try == 50 {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("session %d: dial: %w", id, err)
	}
	s, err := acc.get(c.SessionID())
	if err != nil {
		c.Reset(0, "")
		return err
	}
	defer func() {
		failures.Add(int64(c.Stats().LinkFailures))
	}()

	// Chaos beside the byte-budget faults: the gateway asks the client to
	// move (make-before-break), the client drops its link without a word
	// (the gateway still thinks it is attached: the resume must win).
	stop := make(chan struct{})
	chaos := make(chan struct{})
	go func() {
		defer close(chaos)
		cr := rand.New(rand.NewPCG(id, 99))
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(5+cr.IntN(30)) * time.Millisecond):
			}
			if cr.IntN(2) == 0 {
				s.GoAway("test migration")
			} else {
				c.Kill()
			}
		}
	}()
	defer func() { close(stop); <-chaos }()

	if abort {
		err := abortExchange(id, c, s, up, r)
		if err != nil && logs != nil {
			err = fmt.Errorf("%w\n%s", err, logs.String())
		}
		return err
	}

	var wg sync.WaitGroup
	var upErr, downErr, gotUpErr, gotDownErr error
	var gotUp, gotDown []byte
	wg.Add(4)
	go func() { // client -> gateway, then half-close
		defer wg.Done()
		if upErr = writeRandomly(c, up, rand.New(rand.NewPCG(id, 1))); upErr == nil {
			upErr = c.CloseWrite()
		}
	}()
	go func() { // gateway -> client, then half-close
		defer wg.Done()
		if downErr = writeRandomly(s, down, rand.New(rand.NewPCG(id, 2))); downErr == nil {
			downErr = s.CloseWrite()
		}
	}()
	go func() { defer wg.Done(); gotUp, gotUpErr = io.ReadAll(s) }()
	go func() { defer wg.Done(); gotDown, gotDownErr = io.ReadAll(c) }()
	wg.Wait()
	for _, err := range []error{upErr, downErr, gotUpErr, gotDownErr} {
		if err != nil {
			return fmt.Errorf("session %d: %w", id, err)
		}
	}
	if !bytes.Equal(gotUp, up) {
		return fmt.Errorf("session %d: upstream differs: got %d bytes, want %d (first diff at %d)", id, len(gotUp), len(up), faultnet.FirstDiff(gotUp, up))
	}
	if !bytes.Equal(gotDown, down) {
		return fmt.Errorf("session %d: downstream differs: got %d bytes, want %d (first diff at %d)", id, len(gotDown), len(down), faultnet.FirstDiff(gotDown, down))
	}
	// Both directions closed and acked: the session ends on both sides
	// without parking.
	for _, x := range []*Conn{c, s} {
		select {
		case <-x.Done():
		case <-time.After(30 * time.Second):
			return fmt.Errorf("session %d: not closed after both half-closes (state %v)", id, x.State())
		}
		if err := x.Err(); err != nil {
			return fmt.Errorf("session %d: ended with %v after an orderly close", id, err)
		}
	}
	c.Close()
	s.Close()
	return nil
}

// abortExchange sends part of the data, then the client resets: the
// gateway side must see ErrAppReset, never a silent EOF.
func abortExchange(id uint64, c, s *Conn, up []byte, r *rand.Rand) error {
	half := up[:len(up)/2]
	readDone := make(chan error, 1)
	var got []byte
	go func() {
		var err error
		got, err = io.ReadAll(s)
		readDone <- err
	}()
	if err := writeRandomly(c, half, r); err != nil {
		return fmt.Errorf("session %d: %w", id, err)
	}
	// Wait until the gateway has it all, then abort.
	for i := 0; c.Stats().Buffered > 0 && i < 2000; i++ {
		time.Sleep(5 * time.Millisecond)
	}
	c.Reset(CodeAppReset, "application reset")
	err := <-readDone
	if !errors.Is(err, ErrAppReset) {
		return fmt.Errorf("session %d: gateway read ended with %v, want APP_RESET", id, err)
	}
	if len(got) > len(half) || !bytes.Equal(got, half[:len(got)]) {
		return fmt.Errorf("session %d: bytes before the reset differ", id)
	}
	s.Close()
	return nil
}

func sessionIn(msg string) string {
	i := strings.Index(msg, "(session ")
	if i < 0 {
		return ""
	}
	return msg[i+9 : i+9+16]
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
