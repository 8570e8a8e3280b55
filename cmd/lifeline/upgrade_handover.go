//go:build handover

package main

import (
	"fmt"
	"time"

	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/resume"
)

func init() {
	snapshotVersion = resume.SnapshotVersion
	freezeSessions = func(srv server, wait time.Duration) (proxy.HandoverBatch, error) {
		switch s := srv.(type) {
		case *proxy.Gateway:
			return s.FreezeForHandover(wait)
		case *proxy.Client:
			return s.FreezeForHandover(wait)
		}
		return nil, fmt.Errorf("%T cannot hand sessions over", srv)
	}
	restoreSessions = func(srv server, recs []*proxy.HandoverRecord) (proxy.HandoverTaken, error) {
		switch s := srv.(type) {
		case *proxy.Gateway:
			return s.RestoreHandover(recs)
		case *proxy.Client:
			return s.RestoreHandover(recs)
		}
		return nil, fmt.Errorf("%T cannot take sessions", srv)
	}
}
