#!/bin/sh
# Rebuilds one etcd member's data dir from a snapshot: the "restore" step of
# deploy/README.md ("Backup and restore"). Run it on every member, with the
# same snapshot file and the same new cluster token, while etcd is stopped
# on all of them; then start etcd everywhere.
#
#   restore-member.sh SNAPSHOT NAME PEER_URL INITIAL_CLUSTER TOKEN DATA_DIR
#
#   SNAPSHOT         a file from `etcdctl snapshot save` (copied to each member)
#   NAME             this member's --name, e.g. etcd-a
#   PEER_URL         this member's --initial-advertise-peer-urls
#   INITIAL_CLUSTER  every member, e.g. etcd-a=https://10.0.1.10:2380,...
#   TOKEN            a cluster token not used before, e.g. tidegate-restored-20261122
#   DATA_DIR         where etcd's --data-dir points; must not exist (move the
#                    old one aside: it is evidence, and the way back)
#
# The new token makes a new cluster id: tidegate's controllers and agents
# see it and reload their whole view instead of resuming their watches on a
# history that is not the one they followed.
set -eu

if [ "$#" -ne 6 ]; then
    sed -n '2,17p' "$0" >&2
    exit 64
fi
snapshot=$1 name=$2 peer_url=$3 initial_cluster=$4 token=$5 data_dir=$6

if [ ! -f "$snapshot" ]; then
    echo "restore-member: snapshot $snapshot: no such file" >&2
    exit 66
fi
if [ -e "$data_dir" ]; then
    echo "restore-member: $data_dir exists; stop etcd and move it aside first:" >&2
    echo "  mv $data_dir $data_dir.before-restore-$(date +%Y%m%d%H%M%S)" >&2
    exit 73
fi
case ",$initial_cluster," in
    *",$name=$peer_url,"*) ;;
    *)
        echo "restore-member: INITIAL_CLUSTER does not list $name=$peer_url" >&2
        exit 64
        ;;
esac

# Refuse a damaged file before touching anything.
ETCDCTL_API=3 etcdctl snapshot status "$snapshot" -w table
ETCDCTL_API=3 etcdctl snapshot restore "$snapshot" \
    --name "$name" \
    --initial-advertise-peer-urls "$peer_url" \
    --initial-cluster "$initial_cluster" \
    --initial-cluster-token "$token" \
    --data-dir "$data_dir"
echo "restore-member: $name restored into $data_dir; start etcd on every member now"
