# The ECS cluster, its logs, and the settings every alerting-app container shares.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

data "aws_vpc" "selected" {
  id = var.vpc_id
}

locals {
  container_name = "alerting-app"
  data_dir       = "/data" # DATA_DIR and VOLUME in infra/Dockerfile

  # The HEALTHCHECK command of infra/Dockerfile (tests/test_infra.py compares them): Python itself,
  # never curl or wget, which a slim image does not have. `live` asks /healthz, `ready` /readyz.
  health_check_commands = {
    live    = ["CMD", "python", "-m", "alerting_app.healthcheck"]
    ready   = ["CMD", "python", "-m", "alerting_app.healthcheck", "ready"]
    started = ["CMD", "python", "-m", "alerting_app.healthcheck", "started"]
  }

  # Runs before every deployment, as a one-off task (see outputs.run_migrations_command).
  migrate_command = ["sh", "-c", "alerting-app migrate && alerting-app create-topics"]

  environment = merge(
    {
      KAFKA_BOOTSTRAP_SERVERS  = var.kafka_bootstrap_servers
      KAFKA_SECURITY_PROTOCOL  = var.kafka_security_protocol
      APP_ID                   = var.app_id
      TOPIC_PARTITIONS         = tostring(var.topic_partitions)
      TOPIC_REPLICATION_FACTOR = tostring(var.topic_replication_factor)
      WEB_PORT                 = tostring(var.web_port)
      WEB_BIND                 = "0.0.0.0"
      DATA_DIR                 = local.data_dir
      # One JSON object per line: CloudWatch Logs Insights queries the fields.
      LOG_FORMAT = "json"
      # Longer than the local defaults: a member busy with a batch is not dropped from a rebalance,
      # and a stopped task's partitions move to the others within the session timeout.
      BROKER_REBALANCE_TIMEOUT_S = "60"
      BROKER_SESSION_TIMEOUT_S   = "30"
    },
    var.redis_url == null ? {} : { REDIS_URL = var.redis_url },
    # MSK's IAM login, over TLS whatever kafka_security_protocol says: the task role's credentials
    # sign the token (iam.tf grants the cluster's actions).
    var.msk_iam_cluster_arn == null ? {} : { KAFKA_SECURITY_PROTOCOL = "SASL_SSL", KAFKA_SASL_MECHANISM = "AWS_MSK_IAM" },
    var.extra_environment,
  )
  secrets = merge(
    {
      DATABASE_URL = var.database_url_secret_arn
      ADMIN_TOKEN  = var.admin_token_secret_arn
    },
    var.extra_secrets,
  )

  # ECS wants lists of {name, value} / {name, valueFrom}, sorted so that plans are stable.
  environment_list = [for k in sort(keys(local.environment)) : { name = k, value = local.environment[k] }]
  secrets_list     = [for k in sort(keys(local.secrets)) : { name = k, valueFrom = local.secrets[k] }]
}

resource "aws_ecs_cluster" "this" {
  name = var.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_ecs_cluster_capacity_providers" "this" {
  cluster_name       = aws_ecs_cluster.this.name
  capacity_providers = ["FARGATE"]

  default_capacity_provider_strategy {
    capacity_provider = "FARGATE"
    weight            = 1
  }
}

# One log group; each service writes under its own stream prefix (`worker/alerting-app/<task id>`).
resource "aws_cloudwatch_log_group" "this" {
  name              = "/ecs/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.logs.arn
}

resource "aws_kms_key" "logs" {
  description             = "${var.name}: CloudWatch Logs of the alerting-app tasks"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.logs_key.json
}

resource "aws_kms_alias" "logs" {
  name          = "alias/${var.name}-logs"
  target_key_id = aws_kms_key.logs.key_id
}

# A key policy, not an IAM policy: its "*" resource is this key alone (AWS's documented form), and the
# account administering its own key through IAM is the default key policy. Checkov's IAM checks read it
# as an identity policy, hence these skips (docs/operations.md, "checkov").
data "aws_iam_policy_document" "logs_key" {
  #checkov:skip=CKV_AWS_109:key policy; "*" is this key, administered by its own account
  #checkov:skip=CKV_AWS_111:key policy; "*" is this key, administered by its own account
  #checkov:skip=CKV_AWS_356:key policy; "*" is this key, administered by its own account
  statement {
    sid       = "AccountAdministersTheKey"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }

  statement {
    sid       = "CloudWatchLogsUsesTheKeyForThisLogGroup"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnEquals"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${data.aws_partition.current.partition}:logs:${var.region}:${data.aws_caller_identity.current.account_id}:log-group:/ecs/${var.name}"]
    }
  }
}
