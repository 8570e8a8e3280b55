package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/resume"
)

// clusterFile is a gateway's cluster section (docs/cluster.md):
//
//	gateway:
//	  node_id: gw-1
//	  cluster: {listen: 0.0.0.0:7100, peers: [gw-1:7100, gw-2:7100, gw-3:7100], key_file: /etc/lifeline/cluster.key}
type clusterFile struct {
	Listen  string   `yaml:"listen"`
	Peers   addrList `yaml:"peers"`
	KeyFile string   `yaml:"key_file"`
}

func (cf clusterFile) enabled() bool {
	return cf.Listen != "" || len(cf.Peers) > 0 || cf.KeyFile != ""
}

// validateCluster checks a gateway's node id and cluster section.
func validateCluster(nodeID string, cf clusterFile) error {
	if nodeID != "" {
		if err := proxy.ValidateNodeName(nodeID); err != nil {
			return fmt.Errorf("gateway: %v", err)
		}
	}
	if !cf.enabled() {
		return nil
	}
	if cf.KeyFile == "" {
		return errors.New("gateway cluster: a key file is needed (--cluster-key-file): the shared secret that authenticates the nodes to each other")
	}
	if cf.Listen == "" && len(cf.Peers) == 0 {
		return errors.New("gateway cluster: give the cluster listen address (--cluster-listen) and the peers (--cluster-peers)")
	}
	if cf.Listen != "" {
		if err := proxy.ValidateHostPort(cf.Listen); err != nil {
			return fmt.Errorf("gateway cluster listen: %v", err)
		}
	}
	for _, p := range cf.Peers {
		if err := proxy.ValidateHostPort(p); err != nil {
			return fmt.Errorf("gateway cluster peer: %v", err)
		}
	}
	return nil
}

// nodeName is the gateway's node name: node_id if given, else one derived
// from the host name and the first link listen address, stable across
// restarts of the same gateway on the same machine (and distinct for two
// gateways on one machine, which cannot share a listen address).
func nodeName(nodeID string, listen []string) string {
	if nodeID != "" {
		return nodeID
	}
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "localhost"
	}
	name := host
	if len(listen) > 0 {
		name += "/" + listen[0]
	}
	return name
}

// startCluster gives sc the gateway's node id (from nodeID, else derived
// from listen) and, if cf enables it, starts its peer layer (nil
// otherwise). The caller owns the cluster until a Gateway takes it.
// logNode logs the node's name and id; call it once the gateway listens
// (a start that fails says only why).
func startCluster(nodeID string, listen []string, cf clusterFile, sc *resume.ServerConfig, log *slog.Logger, metrics proxy.Metrics) (cl *proxy.Cluster, logNode func(), err error) {
	name := nodeName(nodeID, listen)
	if err := proxy.ValidateNodeName(name); err != nil {
		// A derived name with characters a name may not have (a host
		// name with spaces): ask for one.
		return nil, nil, usagef("%v; set --node-id", err)
	}
	sc.NodeID = proxy.NodeIDOf(name)
	logNode = func() {
		log.Info("gateway node", "node", name, "node_id", sc.NodeID.String(), "cluster", cl != nil)
	}
	if !cf.enabled() {
		return nil, logNode, nil
	}
	key, err := proxy.ReadClusterKey(cf.KeyFile)
	if err != nil {
		return nil, nil, err
	}
	var reg prometheus.Registerer
	if pm, ok := metrics.(*proxy.PromMetrics); ok {
		reg = pm.Registry()
	}
	cl, err = proxy.NewCluster(proxy.ClusterConfig{NodeName: name, Key: key, Listen: cf.Listen, Peers: cf.Peers,
		Logger: log, Registry: reg})
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: %w", err)
	}
	return cl, logNode, nil
}

// commaListFlag sets a list from one comma-separated value (and appends
// when repeated): --cluster-peers a:1,b:2.
type commaListFlag struct{ l *addrList }

func (f commaListFlag) String() string {
	if f.l == nil {
		return ""
	}
	return strings.Join(*f.l, ",")
}

func (f commaListFlag) Set(s string) error {
	for _, a := range strings.Split(s, ",") {
		if a = strings.TrimSpace(a); a != "" {
			*f.l = append(*f.l, a)
		}
	}
	return nil
}
