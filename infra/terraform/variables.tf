# Inputs. Kafka (MSK), Postgres (RDS) and Redis (ElastiCache) are not created here: they are inputs,
# because their lifecycle (backups, upgrades, sizing) is not the workers' and a `terraform destroy` of
# the workers must never take the data with it.

variable "name" {
  description = "Prefix of every resource name (cluster, services, log group, roles)."
  type        = string
  default     = "alerting"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "name: lower-case letters, digits and dashes, 2-31 characters, starting with a letter."
  }
}

variable "region" {
  description = "AWS region, e.g. eu-west-1."
  type        = string
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}

variable "image" {
  description = "The alerting-app image (infra/Dockerfile) in a registry ECS can pull from, by immutable tag or digest, e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/alerting-app@sha256:..."
  type        = string

  validation {
    condition     = !endswith(var.image, ":latest")
    error_message = "image: use an immutable tag or a digest, not :latest (a rollback must be able to name the previous image)."
  }
}

variable "cpu_architecture" {
  description = "X86_64 or ARM64: the architecture the image was built for."
  type        = string
  default     = "X86_64"

  validation {
    condition     = contains(["X86_64", "ARM64"], var.cpu_architecture)
    error_message = "cpu_architecture: X86_64 or ARM64."
  }
}

# --- network ---------------------------------------------------------------------------------

variable "vpc_id" {
  description = "VPC of the services; MSK, RDS and ElastiCache must be reachable from it."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the tasks (with a NAT gateway or VPC endpoints for ECR, CloudWatch Logs and Secrets Manager, and a route to the webhooks' hosts)."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "subnet_ids: at least one subnet."
  }
}

variable "assign_public_ip" {
  description = "Give tasks a public IP (only for subnets without a NAT gateway; private subnets are the norm)."
  type        = bool
  default     = false
}

variable "api_ingress_cidr_blocks" {
  description = "CIDR blocks allowed to reach the REST API (WEB_PORT) on the tasks, e.g. an internal network."
  type        = list(string)
  default     = []
}

variable "api_ingress_security_group_ids" {
  description = "Security groups (e.g. a load balancer's) allowed to reach the REST API on the tasks."
  type        = list(string)
  default     = []
}

variable "webhook_egress_ports" {
  description = "TCP ports the workers may reach on any address: webhook, Slack and SMTP hosts, and AWS APIs without VPC endpoints. Add SMTP_PORT when e-mail is on (e.g. 587, as for SES)."
  type        = list(number)
  default     = [443, 80]
}

variable "kafka_ports" {
  description = "Broker ports inside the VPC (MSK: 9094 TLS, 9096 SASL/SCRAM over TLS, 9098 IAM over TLS, 9092 plaintext)."
  type        = list(number)
  default     = [9094]
}

variable "kafka_security_protocol" {
  description = "KAFKA_SECURITY_PROTOCOL: SSL (TLS to the brokers, checked against the system's CAs, which MSK's certificates chain to), SASL_SSL (the same TLS and a SASL login: SCRAM with KAFKA_SASL_USERNAME in extra_environment and KAFKA_SASL_PASSWORD in extra_secrets, or MSK's IAM login, which msk_iam_cluster_arn sets up, SASL_SSL included), or PLAINTEXT."
  type        = string
  default     = "SSL"

  validation {
    condition     = contains(["SSL", "SASL_SSL", "PLAINTEXT"], var.kafka_security_protocol)
    error_message = "kafka_security_protocol: SSL, SASL_SSL or PLAINTEXT."
  }
}

variable "msk_iam_cluster_arn" {
  description = "The MSK cluster's ARN, to sign in with IAM (port 9098; KAFKA_SECURITY_PROTOCOL is then SASL_SSL): the task role may then connect and use the cluster's topics and consumer groups, and the workers sign in with its credentials (KAFKA_SASL_MECHANISM=AWS_MSK_IAM)."
  type        = string
  default     = null

  validation {
    condition     = var.msk_iam_cluster_arn == null || can(regex("^arn:[^:]+:kafka:[^:]+:[0-9]+:cluster/[^/]+/[^/]+$", var.msk_iam_cluster_arn))
    error_message = "msk_iam_cluster_arn: arn:aws:kafka:<region>:<account>:cluster/<name>/<uuid>."
  }
}

variable "postgres_port" {
  description = "Postgres port inside the VPC."
  type        = number
  default     = 5432
}

variable "redis_port" {
  description = "Redis port inside the VPC."
  type        = number
  default     = 6379
}

# --- services the workers use (created elsewhere) ---------------------------------------------

variable "kafka_bootstrap_servers" {
  description = "KAFKA_BOOTSTRAP_SERVERS: host:port[,host:port] of the MSK brokers (their TLS listener, 9094, with kafka_security_protocol SSL)."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9_.:\\[\\]-]+:[0-9]{1,5}(,[A-Za-z0-9_.:\\[\\]-]+:[0-9]{1,5})*$", var.kafka_bootstrap_servers))
    error_message = "kafka_bootstrap_servers: host:port[,host:port]."
  }
}

variable "database_url_secret_arn" {
  description = "ARN of a Secrets Manager secret (or SSM SecureString parameter) holding DATABASE_URL: the postgresql:// URL of the RDS database, credentials included."
  type        = string
}

variable "admin_token_secret_arn" {
  description = "ARN of a Secrets Manager secret (or SSM SecureString parameter) holding ADMIN_TOKEN (at least 16 characters)."
  type        = string
}

variable "redis_url" {
  description = "REDIS_URL of ElastiCache, e.g. rediss://master.xxx.cache.amazonaws.com:6379/0. If it carries a password, put it in extra_secrets as REDIS_URL instead and leave this null."
  type        = string
  default     = null

  validation {
    # In clear in the task definition and the state: a password belongs in extra_secrets.
    condition     = var.redis_url == null || !can(regex("://[^/@]*:[^/@]*@", var.redis_url))
    error_message = "redis_url carries a password: put the URL in extra_secrets as REDIS_URL (an ARN) and leave redis_url null."
  }
}

variable "secrets_kms_key_arn" {
  description = "KMS key that encrypts the secrets above, when it is a customer-managed key (the execution role may then decrypt with it)."
  type        = string
  default     = null
}

variable "extra_environment" {
  description = "More environment variables for every container (e.g. SMTP_HOST, LOG_LEVEL, WEBHOOK_TIMEOUT_S). Secrets go in extra_secrets."
  type        = map(string)
  default     = {}

  validation {
    # Plain environment variables are readable in the task definition and the Terraform state.
    condition     = length(setintersection(keys(var.extra_environment), ["ADMIN_TOKEN", "INGEST_TOKEN", "SMTP_PASSWORD", "KAFKA_SASL_PASSWORD", "DATABASE_URL"])) == 0
    error_message = "ADMIN_TOKEN, INGEST_TOKEN, SMTP_PASSWORD, KAFKA_SASL_PASSWORD and DATABASE_URL are secrets: give them in extra_secrets (or their own *_secret_arn variable), not extra_environment."
  }
  validation {
    condition     = !can(regex("://[^/@]*:[^/@]*@", lookup(var.extra_environment, "REDIS_URL", "")))
    error_message = "extra_environment.REDIS_URL carries a password: give it in extra_secrets instead."
  }
}

variable "extra_secrets" {
  description = "More environment variables read from Secrets Manager or SSM: NAME => ARN (e.g. SMTP_PASSWORD), or a Secrets Manager ARN followed by :json-key:: to read one key of a JSON secret (e.g. KAFKA_SASL_PASSWORD from MSK's SCRAM secret, ...:password::)."
  type        = map(string)
  default     = {}
}

# --- the application --------------------------------------------------------------------------

variable "app_id" {
  description = "APP_ID: the Kafka consumer group and prefix of the table changelogs. A new value starts a new group (see docs/operations.md, replay and re-partitioning)."
  type        = string
  default     = "alerting-app"
}

variable "topic_partitions" {
  description = "TOPIC_PARTITIONS: partitions of every topic, and so the ceiling of tasks that consume in parallel per consumer group."
  type        = number
  default     = 9
}

variable "topic_replication_factor" {
  description = "TOPIC_REPLICATION_FACTOR for the topics `create-topics` makes (3 on a three-broker MSK cluster; at most the cluster's broker count, or create-topics fails)."
  type        = number
  default     = 3
}

variable "web_port" {
  description = "WEB_PORT: the worker's HTTP port (REST API, /healthz, /readyz, /metrics)."
  type        = number
  default     = 6066
}

variable "services" {
  description = <<-EOT
    ECS services to run, all from the same image and task settings. `roles` empty runs every agent and
    the API in each task (one scalable worker service, the default); otherwise it is passed as
    `--roles a,b` (evaluate, aggregate, deliver, relay, api) so evaluation and delivery can be scaled
    separately. Tasks beyond topic_partitions would sit idle in their consumer group, hence
    max_count <= topic_partitions for services that consume (evaluate, aggregate or deliver).
  EOT
  type = map(object({
    roles            = optional(list(string), [])
    desired_count    = optional(number, 2)
    min_count        = optional(number, 2)
    max_count        = optional(number, 9)
    cpu              = optional(number, 1024)
    memory           = optional(number, 2048)
    cpu_target       = optional(number, 60) # autoscaling target, percent of the task's CPU
    target_group_arn = optional(string)     # a load balancer's target group for the API, if any
  }))
  default = {
    worker = {}
  }

  validation {
    condition     = alltrue([for s in values(var.services) : s.min_count <= s.desired_count && s.desired_count <= s.max_count])
    error_message = "services: min_count <= desired_count <= max_count."
  }

  validation {
    condition     = alltrue([for s in values(var.services) : length(setsubtract(s.roles, ["evaluate", "aggregate", "deliver", "relay", "api"])) == 0])
    error_message = "services: roles are evaluate, aggregate, deliver, relay and api (empty: all)."
  }

  validation {
    # Every stage needs a service, or alerts stop at it. (No service at all is the first deploy.)
    condition = length(var.services) == 0 || anytrue([for s in values(var.services) : length(s.roles) == 0]) || length(setsubtract(
      ["evaluate", "aggregate", "deliver", "relay"], flatten([for s in values(var.services) : s.roles])
    )) == 0
    error_message = "services: together they must run evaluate, aggregate, deliver and relay."
  }
}

variable "health_check" {
  description = "What the ECS container health check asks: \"started\" (/startedz: the worker has been ready once; a revision that never gets ready is rolled back, a later outage of its dependencies restarts nothing), \"ready\" (/readyz: broker, Postgres and its schema, Redis, the rule and silence replicas, now) or \"live\" (/healthz: the process answers). See docs/operations.md."
  type        = string
  default     = "started"

  validation {
    condition     = contains(["started", "ready", "live"], var.health_check)
    error_message = "health_check: started, ready or live."
  }
}

variable "readonly_root_filesystem" {
  description = "Run containers with a read-only root filesystem; the worker writes only under DATA_DIR (/data, a task volume)."
  type        = bool
  default     = true
}

variable "log_retention_days" {
  description = "Retention of the CloudWatch log group."
  type        = number
  default     = 365
}

variable "wait_for_steady_state" {
  description = "Let `terraform apply` wait until each deployment completes, so a rolled-back deployment fails the apply."
  type        = bool
  default     = true
}
