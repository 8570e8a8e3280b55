//go:build !linux

package resume

import (
	"errors"
	"syscall"
)

// spliceRx: elsewhere DATA payloads are always copied through the
// receive buffer.
const spliceRx = false

type rxPipe struct{}

var errNoSplice = errors.New("resume: splice is not supported here")

func getPipe() (*rxPipe, error)                                         { return nil, errNoSplice }
func putPipe(*rxPipe)                                                   {}
func (*rxPipe) close()                                                  {}
func closeIdlePipes() int                                               { return 0 }
func spliceIn(syscall.RawConn, int, string, bool) (*rxPipe, int, error) { return nil, 0, errNoPipe }
func spliceOut(syscall.RawConn, *rxPipe, int) int                       { return 0 }
func readPipe(*rxPipe, []byte) error                                    { return errNoSplice }
func spliceConn(any) syscall.RawConn                                    { return nil }

// Elsewhere ReadFrom always copies through the replay buffer.
func (s *session) txSpliceRoom(int) (int, chan struct{}) { return 0, nil }
func (s *session) spliceSend(syscall.RawConn, int, bool) (int, error, error) {
	return 0, errNoSplice, nil
}

func getTxPipe() (*rxPipe, int)       { return nil, 0 }
func putTxPipe(*rxPipe)               {}
func dropFromPipe(*rxPipe, int) error { return errNoSplice }
