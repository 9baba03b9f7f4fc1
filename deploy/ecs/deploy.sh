#!/usr/bin/env bash
# Deploy dynamo-py on Amazon ECS with the AWS CLI v2, in dependency order:
#
#   1. CloudWatch log group, HF token secret (placeholder unless HF_TOKEN is set), API key
#      secret (a random key unless API_KEY is set or dynamo/api-key exists)
#   2. Cloud Map private DNS namespace (default dynamo.local) with names for etcd and nats
#   3. task definitions (deploy/ecs/task-definitions/*.json, ${VARS} filled in from below)
#   4. etcd and NATS services on Fargate (awsvpc), registered in Cloud Map; wait until stable
#   5. frontend service on Fargate (optionally behind an ALB target group); wait
#   6. GPU workers on the EC2 cluster (host networking, one GPU each): aggregated workers
#      (TOPOLOGY=agg) or prefill + decode workers (TOPOLOGY=disagg); wait
#
# Workers find etcd and NATS through the injected ETCD_ENDPOINTS / NATS_SERVER, which point at
# the Cloud Map names (etcd.dynamo.local, nats.dynamo.local). Re-running updates the services to
# the newly registered task definition revisions.
#
# Required environment:
#   VPC_ID, SUBNETS (comma separated), SECURITY_GROUP   network shared by both clusters
#   GPU_CLUSTER        ECS cluster of GPU EC2 instances (ECS GPU-optimized AMI) in that VPC
#   IMAGE_CPU, IMAGE_CUDA   image URIs (docker build -f deploy/docker/Dockerfile --target cpu|cuda)
#   EFS_FILE_SYSTEM_ID  EFS file system holding /MODEL_NAME (mounted at /models)
# Optional (defaults): AWS_REGION (from the CLI config), FARGATE_CLUSTER (dynamo-fargate,
#   created if missing), TOPOLOGY (disagg), ROUTER_MODE (kv), ENGINE (builtin),
#   MODEL_NAME (dynamo-tiny), MAX_MODEL_LEN (2048), DYN_NAMESPACE (dynamo),
#   CLOUDMAP_NAMESPACE (dynamo.local), LOG_GROUP (/ecs/dynamo),
#   EXECUTION_ROLE_NAME (ecsTaskExecutionRole), TASK_ROLE_NAME (ecsTaskExecutionRole),
#   HF_TOKEN_SECRET_ARN (created as dynamo/hf-token), HF_TOKEN, API_KEY_SECRET_ARN (created as
#   dynamo/api-key), API_KEY, GPU_INSTANCE_TYPE_PATTERN (g6e.*),
#   WORKER_COUNT (1 per role), FRONTEND_COUNT (1), FRONTEND_TARGET_GROUP_ARN, ASSIGN_PUBLIC_IP
#   (DISABLED), DRY_RUN=1 (render the task definitions into $OUT_DIR and stop).
set -euo pipefail
cd "$(dirname "$0")"

: "${AWS_REGION:=$(aws configure get region 2>/dev/null || true)}"
: "${FARGATE_CLUSTER:=dynamo-fargate}"
: "${TOPOLOGY:=disagg}"
: "${ROUTER_MODE:=kv}"
: "${ENGINE:=builtin}"
: "${MODEL_NAME:=dynamo-tiny}"
: "${MAX_MODEL_LEN:=2048}"
: "${DYN_NAMESPACE:=dynamo}"
: "${CLOUDMAP_NAMESPACE:=dynamo.local}"
: "${LOG_GROUP:=/ecs/dynamo}"
: "${EXECUTION_ROLE_NAME:=ecsTaskExecutionRole}"
: "${TASK_ROLE_NAME:=ecsTaskExecutionRole}"
: "${GPU_INSTANCE_TYPE_PATTERN:=g6e.*}"
: "${WORKER_COUNT:=1}"
: "${FRONTEND_COUNT:=1}"
: "${ASSIGN_PUBLIC_IP:=DISABLED}"
: "${OUT_DIR:=$(mktemp -d)}"
mkdir -p "$OUT_DIR"
: "${NATS_SERVER:=nats://nats.${CLOUDMAP_NAMESPACE}:4222}"
: "${ETCD_ENDPOINTS:=http://etcd.${CLOUDMAP_NAMESPACE}:2379}"

# The placeholders the task definition templates may use; render() fills exactly these.
TEMPLATE_VARS=(AWS_REGION AWS_ACCOUNT_ID LOG_GROUP EXECUTION_ROLE_NAME TASK_ROLE_NAME
  IMAGE_CPU IMAGE_CUDA EFS_FILE_SYSTEM_ID NATS_SERVER ETCD_ENDPOINTS DYN_NAMESPACE ROUTER_MODE
  ENGINE MODEL_NAME MAX_MODEL_LEN HF_TOKEN_SECRET_ARN API_KEY_SECRET_ARN GPU_INSTANCE_TYPE_PATTERN)

case "$TOPOLOGY" in
  agg) WORKER_ROLES=(worker) ;;
  disagg) WORKER_ROLES=(prefill decode) ;;
  *) echo "TOPOLOGY must be agg or disagg" >&2; exit 2 ;;
esac

need() { for v in "$@"; do [ -n "${!v:-}" ] || { echo "set $v" >&2; exit 2; }; done; }
log() { printf '\n== %s\n' "$*"; }

render() {  # render TEMPLATE OUT: replace ${VAR} for each VAR in TEMPLATE_VARS
  local text v
  text="$(cat "$1")"
  for v in "${TEMPLATE_VARS[@]}"; do
    text="${text//\$\{$v\}/${!v}}"
  done
  if grep -q '\${' <<<"$text"; then
    echo "unfilled placeholder in $1: $(grep -o '\${[A-Z_]*}' <<<"$text" | sort -u | tr '\n' ' ')" >&2
    exit 1
  fi
  printf '%s\n' "$text" > "$2"
}

if [ "${DRY_RUN:-0}" = 1 ]; then
  : "${AWS_ACCOUNT_ID:=123456789012}" "${HF_TOKEN_SECRET_ARN:=arn:aws:secretsmanager:${AWS_REGION:-us-east-1}:123456789012:secret:dynamo/hf-token}"
  : "${API_KEY_SECRET_ARN:=arn:aws:secretsmanager:${AWS_REGION:-us-east-1}:123456789012:secret:dynamo/api-key}"
  for f in task-definitions/*.json; do render "$f" "$OUT_DIR/$(basename "$f")"; done
  echo "rendered into $OUT_DIR"
  exit 0
fi

need AWS_REGION VPC_ID SUBNETS SECURITY_GROUP GPU_CLUSTER IMAGE_CPU IMAGE_CUDA EFS_FILE_SYSTEM_ID
export AWS_REGION AWS_DEFAULT_REGION="$AWS_REGION"
AWS_ACCOUNT_ID="$(aws sts get-caller-identity --query Account --output text)"
AWSVPC="awsvpcConfiguration={subnets=[${SUBNETS}],securityGroups=[${SECURITY_GROUP}],assignPublicIp=${ASSIGN_PUBLIC_IP}}"

log "1. log group ${LOG_GROUP} and HF token secret"
aws logs create-log-group --log-group-name "$LOG_GROUP" 2>/dev/null || true
if [ -z "${HF_TOKEN_SECRET_ARN:-}" ]; then
  HF_TOKEN_SECRET_ARN="$(aws secretsmanager describe-secret --secret-id dynamo/hf-token --query ARN --output text 2>/dev/null || true)"
  if [ -z "$HF_TOKEN_SECRET_ARN" ] || [ "$HF_TOKEN_SECRET_ARN" = None ]; then
    HF_TOKEN_SECRET_ARN="$(aws secretsmanager create-secret --name dynamo/hf-token \
      --secret-string "${HF_TOKEN:-placeholder-no-token}" --query ARN --output text)"
  fi
fi

# The frontend's API key (DYN_API_KEY): /v1/* requires `Authorization: Bearer <key>`. Created
# once with a random key unless it exists; read it with
#   aws secretsmanager get-secret-value --secret-id dynamo/api-key --query SecretString --output text
if [ -z "${API_KEY_SECRET_ARN:-}" ]; then
  API_KEY_SECRET_ARN="$(aws secretsmanager describe-secret --secret-id dynamo/api-key --query ARN --output text 2>/dev/null || true)"
  if [ -z "$API_KEY_SECRET_ARN" ] || [ "$API_KEY_SECRET_ARN" = None ]; then
    API_KEY_SECRET_ARN="$(aws secretsmanager create-secret --name dynamo/api-key \
      --secret-string "${API_KEY:-$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')}" --query ARN --output text)"
  fi
fi

log "2. Cloud Map namespace ${CLOUDMAP_NAMESPACE}"
NS_ID="$(aws servicediscovery list-namespaces \
  --query "Namespaces[?Name=='${CLOUDMAP_NAMESPACE}'].Id | [0]" --output text)"
if [ -z "$NS_ID" ] || [ "$NS_ID" = None ]; then
  OP_ID="$(aws servicediscovery create-private-dns-namespace --name "$CLOUDMAP_NAMESPACE" \
    --vpc "$VPC_ID" --query OperationId --output text)"
  until [ "$(aws servicediscovery get-operation --operation-id "$OP_ID" --query Operation.Status --output text)" = SUCCESS ]; do
    sleep 5
  done
  NS_ID="$(aws servicediscovery get-operation --operation-id "$OP_ID" \
    --query 'Operation.Targets.NAMESPACE' --output text)"
fi
registry_arn() {  # registry_arn NAME -> the Cloud Map service ARN (created if missing)
  local arn
  arn="$(aws servicediscovery list-services --filters "Name=NAMESPACE_ID,Values=${NS_ID},Condition=EQ" \
    --query "Services[?Name=='$1'].Arn | [0]" --output text)"
  if [ -z "$arn" ] || [ "$arn" = None ]; then
    arn="$(aws servicediscovery create-service --name "$1" --namespace-id "$NS_ID" \
      --dns-config "NamespaceId=${NS_ID},RoutingPolicy=MULTIVALUE,DnsRecords=[{Type=A,TTL=10}]" \
      --health-check-custom-config FailureThreshold=1 --query Service.Arn --output text)"
  fi
  echo "$arn"
}
ETCD_REGISTRY="$(registry_arn etcd)"
NATS_REGISTRY="$(registry_arn nats)"

log "3. task definitions"
declare -A TASKDEF
for f in task-definitions/*.json; do
  name="$(basename "$f" .json)"
  render "$f" "$OUT_DIR/$name.json"
  TASKDEF[$name]="$(aws ecs register-task-definition --cli-input-json "file://$OUT_DIR/$name.json" \
    --query taskDefinition.taskDefinitionArn --output text)"
  echo "$name -> ${TASKDEF[$name]}"
done

service_exists() {  # service_exists CLUSTER NAME
  [ "$(aws ecs describe-services --cluster "$1" --services "$2" \
    --query 'services[?status==`ACTIVE`] | length(@)' --output text)" = 1 ]
}
deploy_service() {  # deploy_service CLUSTER NAME TASKDEF COUNT [create-service args...]
  local cluster="$1" name="$2" td="$3" count="$4"; shift 4
  if service_exists "$cluster" "$name"; then
    aws ecs update-service --cluster "$cluster" --service "$name" --task-definition "$td" \
      --desired-count "$count" --query service.serviceArn --output text
  else
    aws ecs create-service --cluster "$cluster" --service-name "$name" --task-definition "$td" \
      --desired-count "$count" "$@" --query service.serviceArn --output text
  fi
}

log "4. etcd and NATS on Fargate (${FARGATE_CLUSTER})"
aws ecs describe-clusters --clusters "$FARGATE_CLUSTER" --query 'clusters[?status==`ACTIVE`].clusterName' --output text | grep -q . \
  || aws ecs create-cluster --cluster-name "$FARGATE_CLUSTER" --capacity-providers FARGATE >/dev/null
# one replica each: etcd holds only leases (workers re-register), NATS only in-flight traffic
deploy_service "$FARGATE_CLUSTER" dynamo-etcd "${TASKDEF[etcd]}" 1 --launch-type FARGATE \
  --network-configuration "$AWSVPC" --service-registries "registryArn=${ETCD_REGISTRY}"
deploy_service "$FARGATE_CLUSTER" dynamo-nats "${TASKDEF[nats]}" 1 --launch-type FARGATE \
  --network-configuration "$AWSVPC" --service-registries "registryArn=${NATS_REGISTRY}"
aws ecs wait services-stable --cluster "$FARGATE_CLUSTER" --services dynamo-etcd dynamo-nats

log "5. frontend on Fargate"
LB_ARGS=()
if [ -n "${FRONTEND_TARGET_GROUP_ARN:-}" ]; then
  LB_ARGS=(--load-balancers "targetGroupArn=${FRONTEND_TARGET_GROUP_ARN},containerName=frontend,containerPort=8000"
           --health-check-grace-period-seconds 120)
fi
deploy_service "$FARGATE_CLUSTER" dynamo-frontend "${TASKDEF[frontend]}" "$FRONTEND_COUNT" \
  --launch-type FARGATE --network-configuration "$AWSVPC" "${LB_ARGS[@]}"
aws ecs wait services-stable --cluster "$FARGATE_CLUSTER" --services dynamo-frontend

log "6. ${TOPOLOGY} workers on EC2 (${GPU_CLUSTER})"
# host networking: each role has its own system port (9090/9091/9092), and distinctInstance
# keeps two tasks of one role off the same instance
for role in "${WORKER_ROLES[@]}"; do
  deploy_service "$GPU_CLUSTER" "dynamo-${role}" "${TASKDEF[$role]}" "$WORKER_COUNT" \
    --launch-type EC2 --placement-constraints type=distinctInstance
done
aws ecs wait services-stable --cluster "$GPU_CLUSTER" --services "${WORKER_ROLES[@]/#/dynamo-}"

log "done"
echo "frontend tasks: aws ecs list-tasks --cluster ${FARGATE_CLUSTER} --service-name dynamo-frontend"
