// stargz-peer: stargz-snapshotter's own lazy FUSE filesystem, driven without containerd.
//
// It is the peer of `scripts/bench.py lazy`: one process holds one fs.NewFilesystem (the object
// containerd-stargz-grpc builds at start-up) and mounts layers on request, the way the snapshotter's
// Prepare of a remote snapshot calls FileSystem.Mount once per layer. Registry hosts are built like
// the snapshotter's service/resolver.RegistryHostsFromConfig with an empty config (that package
// itself needs k8s.io/cri-api, which Debian does not package): a go-retryablehttp client with a
// 30 s timeout, a docker authorizer on the same client, plain HTTP for localhost/loopback.
//
// Usage: stargz-peer -root DIR [-config JSON] [-log-level L]
// Commands, one JSON object per stdin line, each answered by one JSON line on stdout:
//
//	{"op":"mount","mountpoint":"/abs","labels":{...}}  -> {"ok":true,"seconds":0.12}
//	{"op":"unmount","mountpoint":"/abs"}               -> {"ok":true,"seconds":0.01}
//
// -config is a JSON form of stargz-snapshotter's fs/config.Config using its Go field names
// (e.g. {"NoBackgroundFetch":true}); the zero value is what an empty config.toml gives.
// stdin EOF, SIGINT or SIGTERM unmount everything still mounted and exit.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/stargz-snapshotter/fs"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/source"
	"github.com/containerd/stargz-snapshotter/snapshot"
	rhttp "github.com/hashicorp/go-retryablehttp"
	"github.com/sirupsen/logrus"
)

// requestTimeout is service/resolver's defaultRequestTimeoutSec.
const requestTimeout = 30 * time.Second

// registryHosts mirrors service/resolver.RegistryHostsFromConfig(resolver.Config{}): a fresh
// retrying client per resolution (fs/remote tunes its retry policy), anonymous docker auth.
func registryHosts(ref reference.Spec) ([]docker.RegistryHost, error) {
	retrying := rhttp.NewClient()
	retrying.Logger = nil
	client := retrying.StandardClient()
	client.Timeout = requestTimeout
	return docker.ConfigureDefaultRegistries(
		docker.WithClient(client),
		docker.WithAuthorizer(docker.NewDockerAuthorizer(docker.WithAuthClient(client))),
		docker.WithPlainHTTP(docker.MatchLocalhost),
	)(ref.Hostname())
}

type command struct {
	Op         string            `json:"op"`
	Mountpoint string            `json:"mountpoint"`
	Labels     map[string]string `json:"labels"`
}

type reply struct {
	OK      bool    `json:"ok"`
	Seconds float64 `json:"seconds"`
	Error   string  `json:"error,omitempty"`
}

type peer struct {
	fs      snapshot.FileSystem
	mu      sync.Mutex
	mounted map[string]bool
}

func (p *peer) do(ctx context.Context, c command) reply {
	started := time.Now()
	var err error
	switch c.Op {
	case "mount":
		// Mount resolves the blob (2 small requests), fetches and verifies the TOC, and serves the
		// layer's tree; file contents are fetched on first read (and by the background fetcher).
		err = p.fs.Mount(ctx, c.Mountpoint, c.Labels)
		if err == nil {
			p.mu.Lock()
			p.mounted[c.Mountpoint] = true
			p.mu.Unlock()
		}
	case "unmount":
		err = p.fs.Unmount(ctx, c.Mountpoint)
		p.mu.Lock()
		delete(p.mounted, c.Mountpoint)
		p.mu.Unlock()
	default:
		err = fmt.Errorf("unknown op %q", c.Op)
	}
	r := reply{OK: err == nil, Seconds: time.Since(started).Seconds()}
	if err != nil {
		r.Error = err.Error()
	}
	return r
}

func (p *peer) unmountAll(ctx context.Context) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for mountpoint := range p.mounted {
		if err := p.fs.Unmount(ctx, mountpoint); err != nil {
			log.G(ctx).WithError(err).Warnf("unmount %s", mountpoint)
		}
		delete(p.mounted, mountpoint)
	}
}

func main() {
	root := flag.String("root", "", "state dir (the snapshotter's ROOT/stargz: fscache/, httpcache/)")
	configJSON := flag.String("config", "{}", "fs/config.Config as JSON (Go field names)")
	logLevel := flag.String("log-level", "info", "logrus level for stderr")
	flag.Parse()
	if *root == "" {
		fmt.Fprintln(os.Stderr, "stargz-peer: -root is required")
		os.Exit(2)
	}
	level, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "stargz-peer: %v\n", err)
		os.Exit(2)
	}
	logrus.SetLevel(level)
	var cfg config.Config
	if err := json.Unmarshal([]byte(*configJSON), &cfg); err != nil {
		fmt.Fprintf(os.Stderr, "stargz-peer: bad -config: %v\n", err)
		os.Exit(2)
	}
	ctx := log.WithLogger(context.Background(), log.L)
	filesystem, err := fs.NewFilesystem(*root, cfg, fs.WithGetSources(source.FromDefaultLabels(registryHosts)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "stargz-peer: %v\n", err)
		os.Exit(1)
	}
	p := &peer{fs: filesystem, mounted: map[string]bool{}}

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-signals
		p.unmountAll(ctx)
		os.Exit(0)
	}()

	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var c command
		r := reply{}
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			r.Error = fmt.Sprintf("bad command: %v", err)
		} else {
			r = p.do(ctx, c)
		}
		if err := out.Encode(r); err != nil {
			break
		}
	}
	p.unmountAll(ctx)
}
