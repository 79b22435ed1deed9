// Command snapdb writes and lists containerd snapshot metadata databases with
// containerd's own snapshots/storage package (the code nydus-snapshotter runs),
// so the Python bbolt reader is checked against the real writer, not a model.
//
//	snapdb apply DB   < {"transactions": [[op, ...], ...]}   one bolt tx per inner list
//	snapdb list  DB   > {"snapshots": [...]}                 via WalkInfo + GetInfo
//	snapdb dump  DB   > generic bbolt tree (hex keys/values, bucket sequences)
//	snapdb churn DB STOPFILE ROUNDS PAUSE_MS   keep the DB open (flock), commit in a loop
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/storage"
	bolt "go.etcd.io/bbolt"
)

type op struct {
	Op     string            `json:"op"`  // active | view | commit | remove | raw-bucket | raw-put
	Key    string            `json:"key"` // snapshot key; for raw-*: "/"-separated bucket path
	Value  string            `json:"value"`
	Parent string            `json:"parent"`
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels"`
	Size   int64             `json:"size"`
	Inodes int64             `json:"inodes"`
}

type script struct {
	Transactions [][]op `json:"transactions"`
}

type listed struct {
	ID        string            `json:"id"`
	Name      string            `json:"name"`
	Kind      string            `json:"kind"`
	Parent    string            `json:"parent"`
	ParentIDs []string          `json:"parent_ids"`
	Labels    map[string]string `json:"labels"`
	CreatedNs int64             `json:"created_ns"`
	UpdatedNs int64             `json:"updated_ns"`
	Size      int64             `json:"size"`
	Inodes    int64             `json:"inodes"`
}

func die(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "snapdb: "+format+"\n", args...)
	os.Exit(1)
}

// rawBucket creates (if needed) the nested bucket path, for schema-violation cases.
func rawBucket(tx *bolt.Tx, path string) (*bolt.Bucket, error) {
	parts := strings.Split(path, "/")
	b, err := tx.CreateBucketIfNotExists([]byte(parts[0]))
	for _, part := range parts[1:] {
		if err != nil {
			return nil, err
		}
		b, err = b.CreateBucketIfNotExists([]byte(part))
	}
	return b, err
}

func applyOp(ctx context.Context, tx *bolt.Tx, o op) error {
	switch o.Op {
	case "raw-bucket":
		_, err := rawBucket(tx, o.Key)
		return err
	case "raw-put":
		b, err := rawBucket(tx, o.Key)
		if err != nil {
			return err
		}
		value, err := hex.DecodeString(o.Value)
		if err != nil {
			return err
		}
		return b.Put([]byte(o.Name), value)
	case "active", "view":
		kind := snapshots.KindActive
		if o.Op == "view" {
			kind = snapshots.KindView
		}
		_, err := storage.CreateSnapshot(ctx, kind, o.Key, o.Parent, snapshots.WithLabels(o.Labels))
		return err
	case "commit":
		_, err := storage.CommitActive(ctx, o.Key, o.Name,
			snapshots.Usage{Size: o.Size, Inodes: o.Inodes}, snapshots.WithLabels(o.Labels))
		return err
	case "remove":
		_, _, err := storage.Remove(ctx, o.Key)
		return err
	}
	return fmt.Errorf("unknown op %q", o.Op)
}

func inTx(ms *storage.MetaStore, writable bool, fn func(ctx context.Context, tx *bolt.Tx) error) error {
	ctx, tx, err := ms.TransactionContext(context.Background(), writable)
	if err != nil {
		return err
	}
	if err := fn(ctx, tx.(*bolt.Tx)); err != nil {
		tx.Rollback()
		return err
	}
	if writable {
		return tx.Commit()
	}
	return tx.Rollback()
}

func apply(db string) {
	var s script
	if err := json.NewDecoder(os.Stdin).Decode(&s); err != nil {
		die("decode script: %v", err)
	}
	ms, err := storage.NewMetaStore(db)
	if err != nil {
		die("%v", err)
	}
	defer ms.Close()
	for i, ops := range s.Transactions {
		err := inTx(ms, true, func(ctx context.Context, tx *bolt.Tx) error {
			for _, o := range ops {
				if err := applyOp(ctx, tx, o); err != nil {
					return fmt.Errorf("%s %q: %w", o.Op, o.Key, err)
				}
			}
			return nil
		})
		if err != nil {
			die("transaction %d: %v", i, err)
		}
	}
}

func kindName(k snapshots.Kind) string {
	switch k {
	case snapshots.KindView:
		return "view"
	case snapshots.KindActive:
		return "active"
	case snapshots.KindCommitted:
		return "committed"
	}
	return "unknown"
}

func list(db string) {
	ms, err := storage.NewMetaStore(db)
	if err != nil {
		die("%v", err)
	}
	defer ms.Close()
	out := []listed{}
	err = inTx(ms, false, func(ctx context.Context, _ *bolt.Tx) error {
		var infos []snapshots.Info
		if err := storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			infos = append(infos, info)
			return nil
		}); err != nil {
			return err
		}
		ids := map[string]string{}
		usages := map[string]snapshots.Usage{}
		for _, info := range infos {
			id, _, usage, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			ids[info.Name] = id
			usages[info.Name] = usage
		}
		for _, info := range infos {
			parentIDs := []string{}
			for p := info.Parent; p != ""; {
				parentIDs = append(parentIDs, ids[p])
				_, pinfo, _, err := storage.GetInfo(ctx, p)
				if err != nil {
					return err
				}
				p = pinfo.Parent
			}
			labels := info.Labels
			if labels == nil {
				labels = map[string]string{}
			}
			out = append(out, listed{
				ID: ids[info.Name], Name: info.Name, Kind: kindName(info.Kind), Parent: info.Parent,
				ParentIDs: parentIDs, Labels: labels,
				CreatedNs: info.Created.UnixNano(), UpdatedNs: info.Updated.UnixNano(),
				Size: usages[info.Name].Size, Inodes: usages[info.Name].Inodes,
			})
		}
		return nil
	})
	if err != nil {
		die("list: %v", err)
	}
	sort.Slice(out, func(i, j int) bool {
		a, _ := strconv.ParseUint(out[i].ID, 10, 64)
		b, _ := strconv.ParseUint(out[j].ID, 10, 64)
		return a < b
	})
	if err := json.NewEncoder(os.Stdout).Encode(map[string]interface{}{"snapshots": out}); err != nil {
		die("%v", err)
	}
}

type dumpedBucket struct {
	Sequence uint64                   `json:"sequence"`
	Values   map[string]string        `json:"values"`
	Buckets  map[string]*dumpedBucket `json:"buckets"`
}

func dumpBucket(b *bolt.Bucket) *dumpedBucket {
	d := &dumpedBucket{Sequence: b.Sequence(), Values: map[string]string{}, Buckets: map[string]*dumpedBucket{}}
	b.ForEach(func(k, v []byte) error {
		if v == nil {
			d.Buckets[hex.EncodeToString(k)] = dumpBucket(b.Bucket(k))
		} else {
			d.Values[hex.EncodeToString(k)] = hex.EncodeToString(v)
		}
		return nil
	})
	return d
}

func dump(db string) {
	bdb, err := bolt.Open(db, 0600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		die("%v", err)
	}
	defer bdb.Close()
	root := &dumpedBucket{Values: map[string]string{}, Buckets: map[string]*dumpedBucket{}}
	var txid int
	bdb.View(func(tx *bolt.Tx) error {
		txid = tx.ID()
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			root.Buckets[hex.EncodeToString(name)] = dumpBucket(b)
			return nil
		})
	})
	json.NewEncoder(os.Stdout).Encode(map[string]interface{}{"txid": txid, "root": root})
}

// churn keeps the store open (holding the flock) and commits one transaction per
// round, `rounds` times, sleeping `pause` between rounds (or until STOPFILE exists): a committed chain link "chain-N" on top of "chain-(N-1)", a committed
// standalone "solo-N" with a large label, and removal of "solo-(N-3)". A
// consistent reader therefore always sees chain-1..N and solo-max(1,N-2)..N.
func churn(db, stopFile string, rounds int, pause time.Duration) {
	ms, err := storage.NewMetaStore(db)
	if err != nil {
		die("%v", err)
	}
	defer ms.Close()
	big := make([]byte, 6000)
	for i := range big {
		big[i] = 'a' + byte(i%26)
	}
	for n := 1; n <= rounds; n++ {
		if _, err := os.Stat(stopFile); err == nil {
			return
		}
		if n > 1 {
			time.Sleep(pause)
		}
		err := inTx(ms, true, func(ctx context.Context, tx *bolt.Tx) error {
			seq := map[string]string{"test/round": strconv.Itoa(n)}
			parent := ""
			if n > 1 {
				parent = fmt.Sprintf("chain-%d", n-1)
			}
			ops := []op{
				{Op: "active", Key: fmt.Sprintf("extract-chain-%d", n), Parent: parent},
				{Op: "commit", Key: fmt.Sprintf("extract-chain-%d", n), Name: fmt.Sprintf("chain-%d", n), Labels: seq},
				{Op: "active", Key: fmt.Sprintf("extract-solo-%d", n)},
				{Op: "commit", Key: fmt.Sprintf("extract-solo-%d", n), Name: fmt.Sprintf("solo-%d", n),
					Labels: map[string]string{"test/round": strconv.Itoa(n), "test/big": string(big)}},
			}
			if n > 3 {
				ops = append(ops, op{Op: "remove", Key: fmt.Sprintf("solo-%d", n-3)})
			}
			for _, o := range ops {
				if err := applyOp(ctx, tx, o); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			die("churn round %d: %v", n, err)
		}
		if n == 1 {
			fmt.Println("ready")
			os.Stdout.Sync()
		}
	}
}

func main() {
	if len(os.Args) < 3 {
		die("usage: snapdb apply|list|dump|churn DB [STOPFILE]")
	}
	switch os.Args[1] {
	case "apply":
		apply(os.Args[2])
	case "list":
		list(os.Args[2])
	case "dump":
		dump(os.Args[2])
	case "churn":
		if len(os.Args) < 6 {
			die("usage: snapdb churn DB STOPFILE ROUNDS PAUSE_MS")
		}
		rounds, err1 := strconv.Atoi(os.Args[4])
		pause, err2 := strconv.Atoi(os.Args[5])
		if err1 != nil || err2 != nil {
			die("ROUNDS and PAUSE_MS must be integers")
		}
		churn(os.Args[2], os.Args[3], rounds, time.Duration(pause)*time.Millisecond)
	default:
		die("unknown command %q", os.Args[1])
	}
}
