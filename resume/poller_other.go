//go:build !linux

package resume

import (
	"errors"
	"syscall"
)

// sharedPollerOK: without epoll, idle link readers park in the runtime's
// poller as goroutines.
const sharedPollerOK = false

type poller struct{}

var readPoller = &poller{}

func (p *poller) register(any, syscall.RawConn) (uint64, error) { return 0, errors.ErrUnsupported }
func (p *poller) unregister(uint64) bool                        { return false }
func (p *poller) registered() int                               { return 0 }

func readableNow(syscall.RawConn) bool { return true }
